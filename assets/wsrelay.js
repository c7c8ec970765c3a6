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
 * Resume (an addition; pages that do not set `resume` get exactly the behaviour above):
 *   resume: true     the socket offers the gateway's envelope (subprotocol `wsrelay.v1`),
 *                    which gives every publication on a facility with history
 *                    (`[[facility]] history`) an id. The helper remembers the newest id per
 *                    key (`broadcast`, `user`, `session`, `group:<name>`) and reconnects
 *                    with `last-id=<key>:<id>,...` added to the URL, so the gateway first
 *                    replays what the page missed, in order, once. receive_message still
 *                    gets the plain payload: a string, or a Blob for a binary one (as for
 *                    a binary frame without the envelope). Ids the page kept from an
 *                    earlier visit may be given in `uri` as a `last-id=` parameter.
 *   on_resumed(key, count)  optional: `count` missed messages of `key` were replayed
 *                    (they went to receive_message just before).
 *   on_reset(key, reason)   optional: what `key` missed cannot be replayed (reason
 *                    "history too short", "history expired", "history lost", "unknown id";
 *                    or "resume failed" when the helper gave up offering its ids after 8
 *                    attempts in a row that never opened, as a gateway refuses a key the
 *                    socket no longer listens to). The key's
 *                    stored message, if any, follows through receive_message.
 *   on_gap(key, reason)     optional: messages of `key`, a key without history, may have
 *                    been missed (reason "the link to redis was lost"); its stored message
 *                    follows.
 *   on_subscribed(keys)     optional: the socket's subscriptions are live (after each
 *                    connect, before its stored or replayed messages): from here on
 *                    nothing published on `keys` is missed.
 *   A gateway that does not choose the envelope is spoken to as without `resume`.
 *
 * The returned object (with or without `new`):
 *   send_message(msg)  sends now when connected (returns true); otherwise queues the
 *                      message for the next connection (returns false). Throws an Error
 *                      when the queue is full or after close().
 *   get_state()        the WebSocket readyState (0 connecting, 1 open, 2 closing,
 *                      3 closed, which includes waiting to reconnect).
 *   is_connecting(), is_connected(), is_closing(), is_closed(): the same, as booleans.
 *   close()            closes for good: no reconnection, queued messages are dropped.
 *   get_last_ids()     with `resume`, the newest id per key ({broadcast: '1700000000000-0'}),
 *                      to keep for a later visit; {} without it.
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
    var SUBPROTOCOL = 'wsrelay.v1';
    // Attempts in a row that offered ids and never opened before the helper forgets them.
    var RESUME_ATTEMPTS = 8;

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

    // Splits `url` into the URL without its `last-id` parameters and the ids they give
    // ({label: id}); ids that do not read as <label>:<id> are left out.
    function takeLastIds(url) {
        var ids = {};
        var q = url.indexOf('?');
        if (q < 0) {
            return { url: url, ids: ids };
        }
        var kept = [];
        url.slice(q + 1).split('&').forEach(function (param) {
            var eq = param.indexOf('=');
            var name = eq < 0 ? param : param.slice(0, eq);
            if (name.toLowerCase() !== 'last-id') {
                kept.push(param);
                return;
            }
            var value;
            try {
                value = decodeURIComponent(param.slice(eq + 1));
            } catch (e) {
                return;
            }
            value.split(',').forEach(function (item) {
                var colon = item.lastIndexOf(':');
                if (eq >= 0 && colon > 0 && colon < item.length - 1) {
                    ids[item.slice(0, colon)] = item.slice(colon + 1);
                }
            });
        });
        var base = url.slice(0, q);
        return { url: kept.length > 0 ? base + '?' + kept.join('&') : base, ids: ids };
    }

    // `url` with `last-id=<label>:<id>,...` for the ids in `ids`, if any.
    function withLastIds(url, ids) {
        var items = Object.keys(ids).map(function (label) {
            return label + ':' + ids[label];
        });
        if (items.length === 0) {
            return url;
        }
        var param = 'last-id=' + encodeURIComponent(items.join(','));
        var q = url.indexOf('?');
        if (q < 0) {
            return url + '?' + param;
        }
        return url + (q === url.length - 1 || url.slice(-1) === '&' ? '' : '&') + param;
    }

    // The payload of a `data_base64` envelope: a Blob, as a binary frame gives.
    function binaryPayload(base64) {
        var raw = atob(base64);
        var bytes = new Uint8Array(raw.length);
        for (var i = 0; i < raw.length; i++) {
            bytes[i] = raw.charCodeAt(i);
        }
        return typeof Blob === 'function' ? new Blob([bytes]) : bytes.buffer;
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
        var resume = options.resume === true;
        var lastIds = {};           // with `resume`: the newest id per key label
        var failedResumes = 0;      // attempts in a row that offered ids and never opened
        if (resume) {
            var given = takeLastIds(url);
            url = given.url;
            lastIds = given.ids;
        }
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
        function call(callback, arg, second) {
            if (!isFunction(callback)) {
                return;
            }
            try {
                if (arguments.length > 2) {
                    callback(arg, second);
                } else {
                    callback(arg);
                }
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
                sock = resume
                    ? new WebSocket(withLastIds(url, lastIds), [SUBPROTOCOL])
                    : new WebSocket(url);
            } catch (e) {
                scheduleReconnect();
                setTimeout(function () { throw e; }, 0);
                return;
            }
            ws = sock;
            var offeredIds = resume && Object.keys(lastIds).length > 0;
            var opened = false;
            sock.onopen = function () {
                if (sock === ws) {
                    opened = true;
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
                    if (offeredIds && !opened) {
                        resumeFailed();
                    }
                    onClose(evt);
                }
            };
            // An error is always followed by a close event, which does the work.
            sock.onerror = function () {};
        }

        function onOpen() {
            failedResumes = 0;
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
            if (resume && typeof evt.data === 'string' && ws.protocol === SUBPROTOCOL) {
                onEnvelope(evt.data);
                return;
            }
            call(options.receive_message, evt.data);
        }

        // One JSON text of the envelope: a message (its payload goes to receive_message,
        // its id is remembered) or a control message for the page's callbacks.
        function onEnvelope(text) {
            var m = null;
            try {
                m = JSON.parse(text);
            } catch (e) {
                // Not the envelope: passed on as it came.
            }
            if (m === null || typeof m !== 'object' || typeof m.type !== 'string') {
                call(options.receive_message, text);
                return;
            }
            switch (m.type) {
            case 'message':
                if (typeof m.key === 'string' && typeof m.id === 'string') {
                    lastIds[m.key] = m.id;
                }
                var payload;
                if (typeof m.data === 'string') {
                    payload = m.data;
                } else if (typeof m.data_base64 === 'string') {
                    payload = binaryPayload(m.data_base64);
                } else {
                    return;
                }
                if (heartbeatMsg !== null && payload === heartbeatMsg) {
                    return;
                }
                call(options.receive_message, payload);
                return;
            case 'resumed':
                call(options.on_resumed, m.key, m.count);
                return;
            case 'reset':
                // The key's id stays: until a newer one arrives, a reconnect is told again
                // that what was missed is not known.
                call(options.on_reset, m.key, m.reason);
                return;
            case 'gap':
                call(options.on_gap, m.key, m.reason);
                return;
            case 'subscribed':
                call(options.on_subscribed, m.keys);
                return;
            default:
                // A control message of a later version: nothing for this helper.
                return;
            }
        }

        // An attempt that offered ids never opened: the gateway may be away, or refuse
        // them (HTTP 400, which a browser does not show). After RESUME_ATTEMPTS in a row
        // the ids are forgotten, and the page told, rather than retrying forever.
        function resumeFailed() {
            failedResumes += 1;
            if (failedResumes < RESUME_ATTEMPTS) {
                return;
            }
            failedResumes = 0;
            var labels = Object.keys(lastIds);
            lastIds = {};
            labels.forEach(function (label) {
                call(options.on_reset, label, 'resume failed');
            });
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
            get_last_ids: function () {
                var copy = {};
                Object.keys(lastIds).forEach(function (label) {
                    copy[label] = lastIds[label];
                });
                return copy;
            },
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
