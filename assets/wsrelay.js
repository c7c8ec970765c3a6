// Placeholder: the browser helper is being written.
function WS4Redis(options) {}
