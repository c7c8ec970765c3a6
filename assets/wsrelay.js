/*
 * wsrelay.js: the browser helper of wsrelay, served by the gateway itself.
 *
 *   <script src="/wsrelay.js"></script>                   (classic script: window.WS4Redis)
 *   import WS4Redis from '/wsrelay.mjs';                   (ES module, same code)
 *
 * A drop-in replacement for django-websocket-redis's ws4redis.js: pages that use it keep
 * working when only the script tag changes. jQuery is not needed; a second argument
 * (ws4redis.js took jQuery there) is accepted and ignored.
 *
 *   var ws4redis = WS4Redis({
 *       uri: 'wss://example.com/ws/chat?subscribe-broadcast&publish-broadcast',
 *       connecting: function () {},          // before every connection attempt
 *       connected: function () {},           // the socket is open
 *       disconnected: function (evt) {},     // every close, evt is the CloseEvent
 *       receive_message: function (msg) {},  // every message except heartbeats
 *       heartbeat_msg: '--heartbeat--'       // the gateway's `heartbeat` setting, or null
 *   }, jQuery);
 *   ws4redis.send_message('hello');
 *
 * Options (as in ws4redis.js; only `uri` is required):
 *   uri              the socket's URL. ws4redis.js takes a full `ws://` or `wss://` URL
 *                    (its WEBSOCKET_URI); so does this helper, and it also accepts a path
 *                    (`/ws/chat?subscribe-broadcast`, resolved against the page's own host,
 *                    `wss:` on https pages) or an `http(s)://` URL (turned into `ws(s)://`).
 *   connecting, connected, disconnected(evt), receive_message(msg): callbacks, all
 *                    optional. Every connection attempt calls `connecting` and, when it
 *                    ends, `disconnected` (also for attempts that never opened).
 *   heartbeat_msg    default null (no heartbeats).
 *   Two additions: heartbeat_interval (ms, default 5000) and queue_limit (default 100).
 *
 * The returned object (with or without `new`):
 *   send_message(msg)  sends now when connected (returns true); otherwise queues the
 *                      message for the next connection (returns false). Throws an Error
 *                      when the queue is full or after close().
 *   get_state()        the WebSocket readyState (0 connecting, 1 open, 2 closing,
 *                      3 closed, which includes waiting to reconnect).
 *   is_connecting(), is_connected(), is_closing(), is_closed(): the same, as booleans.
 *   close()            closes for good: no reconnection, queued messages are dropped.
 *
 * How it behaves, where ws4redis.js did less:
 *   Reconnection     after every close that close() did not ask for. The wait before
 *                    attempt n (n = 0, 1, 2, ...) is random in [0, min(30 s, 500 ms * 2^n)]
 *                    ("full jitter": after a gateway restart, thousands of pages do not all
 *                    come back in the same second). n goes back to 0 when a connection had
 *                    stayed open 5 s or more, so a gateway that accepts and drops sockets
 *                    at once still sees growing waits. The browser's `online` event
 *                    reconnects at once.
 *   Heartbeats       with heartbeat_msg set, the helper sends it every 5 s while connected
 *                    and counts it as missed; any frame from the gateway (its answer to a
 *                    heartbeat, its own idle heartbeat, or a message) sets the count back
 *                    to 0. When the count has reached three at the next beat, the
 *                    connection is taken as dead (so a silent one is noticed within about
 *                    20 s): it is dropped at once, without waiting for a close handshake
 *                    (disconnected() gets a close event with code 1006 and reason "missed
 *                    heartbeats"), and reconnected as above. Heartbeat strings never reach
 *                    receive_message.
 *   Queue            messages sent while not connected wait, in order, up to queue_limit
 *                    (100) of them, and go out as soon as a connection opens, before
 *                    connected() is called. A full queue makes send_message throw: nothing
 *                    is dropped silently.
 *
 * The file defines nothing but `WS4Redis`, and is both a classic script and, with an
 * `export` line appended (as /wsrelay.mjs is served), an ES module.
 */
var WS4Redis = (function () {
    'use strict';

    var RECONNECT_BASE_MS = 500;
    var RECONNECT_CAP_MS = 30000;
    var STABLE_AFTER_MS = 5000;
    var HEARTBEAT_INTERVAL_MS = 5000;
    var MAX_MISSED_HEARTBEATS = 3;
    var QUEUE_LIMIT = 100;
    var OPEN = 1;
    var CLOSED = 3;

    function isFunction(f) {
        return typeof f === 'function';
    }

    // The URL to open: ws(s) URLs as given, http(s) URLs and paths turned into ws(s).
    function socketUrl(uri) {
        if (/^wss?:\/\//i.test(uri)) {
            return uri;
        }
        if (/^https?:\/\//i.test(uri)) {
            return uri.replace(/^http/i, 'ws');
        }
        if (typeof location === 'undefined') {
            return uri;
        }
        var scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
        if (uri.slice(0, 2) === '//') {
            return scheme + uri;
        }
        if (uri.charAt(0) === '/') {
            return scheme + '//' + location.host + uri;
        }
        return uri;
    }

    // A close event for a connection the helper dropped itself.
    function localCloseEvent(reason) {
        var init = { code: 1006, reason: reason, wasClean: false };
        if (typeof CloseEvent === 'function') {
            try {
                return new CloseEvent('close', init);
            } catch (e) {
                // Fall through to a plain object.
            }
        }
        init.type = 'close';
        return init;
    }

    function WS4Redis(options, $) {
        if (!options || typeof options.uri !== 'string' || options.uri === '') {
            throw new Error('WS4Redis: the option `uri` (the socket URL) is required');
        }
        void $; // ws4redis.js wanted jQuery here; nothing is needed.

        var url = socketUrl(options.uri);
        var heartbeatMsg = options.heartbeat_msg || null;
        var heartbeatInterval = options.heartbeat_interval > 0
            ? options.heartbeat_interval : HEARTBEAT_INTERVAL_MS;
        var queueLimit = options.queue_limit > 0 ? options.queue_limit : QUEUE_LIMIT;

        var ws = null;              // the current socket, null while waiting to reconnect
        var stopped = false;        // close() was called
        var attempt = 0;            // reconnection attempts since the last stable connection
        var reconnectTimer = null;
        var heartbeatTimer = null;
        var missedHeartbeats = 0;
        var openedAt = 0;
        var queue = [];

        // A page callback that throws must not stop the helper (no reconnect would be
        // scheduled): its error is rethrown on its own, where the page's console and
        // error handlers still see it.
        function call(callback, arg) {
            if (!isFunction(callback)) {
                return;
            }
            try {
                callback(arg);
            } catch (e) {
                setTimeout(function () { throw e; }, 0);
            }
        }

        function connect() {
            reconnectTimer = null;
            if (stopped) {
                return;
            }
            call(options.connecting);
            if (stopped) {
                return; // connecting() called close()
            }
            var sock;
            try {
                sock = new WebSocket(url);
            } catch (e) {
                scheduleReconnect();
                setTimeout(function () { throw e; }, 0);
                return;
            }
            ws = sock;
            sock.onopen = function () {
                if (sock === ws) {
                    onOpen();
                }
            };
            sock.onmessage = function (evt) {
                if (sock === ws) {
                    onMessage(evt);
                }
            };
            sock.onclose = function (evt) {
                if (sock === ws) {
                    onClose(evt);
                }
            };
            // An error is always followed by a close event, which does the work.
            sock.onerror = function () {};
        }

        function onOpen() {
            openedAt = Date.now();
            missedHeartbeats = 0;
            if (heartbeatMsg !== null) {
                heartbeatTimer = setInterval(beat, heartbeatInterval);
            }
            while (queue.length > 0 && ws !== null && ws.readyState === OPEN) {
                ws.send(queue.shift());
            }
            call(options.connected);
        }

        function onMessage(evt) {
            missedHeartbeats = 0;
            if (heartbeatMsg !== null && evt.data === heartbeatMsg) {
                return;
            }
            call(options.receive_message, evt.data);
        }

        function onClose(evt) {
            var stable = openedAt !== 0 && Date.now() - openedAt >= STABLE_AFTER_MS;
            openedAt = 0;
            ws = null;
            stopHeartbeat();
            if (stable) {
                attempt = 0;
            }
            if (!stopped) {
                scheduleReconnect();
            }
            call(options.disconnected, evt);
        }

        function scheduleReconnect() {
            var ceiling = Math.min(RECONNECT_CAP_MS, RECONNECT_BASE_MS * Math.pow(2, attempt));
            attempt += 1;
            reconnectTimer = setTimeout(connect, Math.random() * ceiling);
        }

        function beat() {
            if (ws === null || ws.readyState !== OPEN) {
                return;
            }
            if (missedHeartbeats >= MAX_MISSED_HEARTBEATS) {
                drop('missed heartbeats');
                return;
            }
            missedHeartbeats += 1;
            ws.send(heartbeatMsg);
        }

        function stopHeartbeat() {
            if (heartbeatTimer !== null) {
                clearInterval(heartbeatTimer);
                heartbeatTimer = null;
            }
        }

        // Gives up on the current socket without waiting for its close handshake, which
        // on a dead network path could take minutes.
        function drop(reason) {
            var dead = ws;
            dead.onopen = dead.onmessage = dead.onclose = dead.onerror = null;
            try {
                dead.close(4001, reason);
            } catch (e) {
                // Closing a dead socket may fail; it is abandoned either way.
            }
            onClose(localCloseEvent(reason));
        }

        function onOnline() {
            if (stopped || ws !== null) {
                return;
            }
            clearTimeout(reconnectTimer);
            attempt = 0;
            connect();
        }

        function hasEvents() {
            return typeof window !== 'undefined' && isFunction(window.addEventListener);
        }

        function state() {
            return ws === null ? CLOSED : ws.readyState;
        }

        connect();
        if (hasEvents()) {
            window.addEventListener('online', onOnline);
        }

        return {
            send_message: function (message) {
                if (stopped) {
                    throw new Error('WS4Redis: send_message after close()');
                }
                if (ws !== null && ws.readyState === OPEN && queue.length === 0) {
                    ws.send(message);
                    return true;
                }
                if (queue.length >= queueLimit) {
                    throw new Error('WS4Redis: not connected and ' + queueLimit +
                        ' messages already wait to be sent');
                }
                queue.push(message);
                return false;
            },
            get_state: state,
            is_connecting: function () {
                return state() === 0;
            },
            is_connected: function () {
                return state() === OPEN;
            },
            is_closing: function () {
                return state() === 2;
            },
            is_closed: function () {
                return state() === CLOSED;
            },
            close: function () {
                if (stopped) {
                    return;
                }
                stopped = true;
                queue = [];
                clearTimeout(reconnectTimer);
                reconnectTimer = null;
                stopHeartbeat();
                if (hasEvents()) {
                    window.removeEventListener('online', onOnline);
                }
                if (ws !== null) {
                    ws.close(1000);
                }
            }
        };
    }

    return WS4Redis;
}());

if (typeof window !== 'undefined') {
    window.WS4Redis = WS4Redis;
}
