/*
 * wsrelay.js: the browser helper of wsrelay, served by the gateway itself.
 *
 *   <script src="/wsrelay.js"></script>                   (classic script: window.WS4Redis)
 *   import WS4Redis from '/wsrelay.mjs';                   (ES module, same code)
 *
 * TypeScript declarations: /wsrelay.d.ts.
 *
 * A drop-in replacement for django-websocket-redis's ws4redis.js: pages that use it keep
 * working when only the script tag changes. jQuery is not needed; a second argument
 * (ws4redis.js took jQuery there) is accepted and ignored.
 *
 *   var ws4redis = WS4Redis({
 *       uri: 'wss://example.com/ws/chat?subscribe-broadcast&publish-broadcast',
 *       connecting: function () {},          // before every connection attempt
 *       connected: function () {},           // the connection is open
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
 * Transports (an addition): where a proxy or a network refuses WebSockets, the helper
 * carries on over Server-Sent Events or long-polling, with the same callbacks.
 *   transports       default ['websocket', 'sse', 'poll']: the order to try them in. The
 *                    gateway's other endpoints are found by replacing the `websocket_url`
 *                    prefix of the uri's path (`/ws/chat?...` gives `/sse/chat?...`); a
 *                    uri whose path does not start with it, or a browser without
 *                    EventSource (sse) or fetch (poll), keeps only what it can use.
 *   websocket_url, sse_url, poll_url, pub_url: the gateway's settings of those names,
 *                    default '/ws/', '/sse/', '/poll/', '/pub/' (a path on the uri's host,
 *                    or a full http(s) URL).
 *   transport_timeout  ms, default 10000: see "Fallback" below.
 *   get_transport()  'websocket', 'sse' or 'poll': the one in use (or tried next).
 *   Fallback         a transport that has never worked in this page is left for the next
 *                    one in `transports` after two attempts in a row that failed: a
 *                    WebSocket that closed before its first frame (an upgrade refused),
 *                    an event stream that failed before its first event, a poll that
 *                    failed or was answered with an error; at once when a WebSocket opened or an event stream started
 *                    but nothing at all arrived within transport_timeout (a proxy that
 *                    drops frames or buffers the stream). So that a working path shows,
 *                    the WebSocket then offers the envelope (see `resume`): the gateway's
 *                    first frame says the subscriptions are live. After the last
 *                    transport the first one is tried again. A transport that has worked
 *                    once is kept for the page's life: its failures are outages (a gateway
 *                    restart), retried with the backoff below. So a page that loads while
 *                    the gateway is down may stay on a fallback until it is reloaded.
 *   Event stream     GET sse_url... with the uri's parameters but publish-* (and last-id);
 *                    the helper
 *                    reconnects itself (not EventSource), passing the newest id of every
 *                    key as `lastEventId=<key>:<id>,...`; binary payloads become Blobs.
 *   Long-poll        GET poll_url... in a loop, `since=<key>:<id>,...` for what was seen;
 *                    connected() comes with the gateway's first answer (at once when a
 *                    key has a stored message, else with the first publication or after
 *                    the gateway's poll_timeout). Between two polls, what the gateway can
 *                    replay is caught up (publications with an id; on a key without
 *                    history, its newest stored message), not a plain Redis PUBLISH.
 *   Publishing       over sse and poll, send_message POSTs each message, in order, to
 *                    pub_url... with the uri's parameters but subscribe-*, echo and
 *                    last-id (nothing is posted when the uri has no publish-* flag, as a
 *                    socket without them publishes nothing); a refused message (HTTP 4xx)
 *                    is dropped and reported as an error thrown on its own; a failed one
 *                    (network, 5xx) is retried with the backoff below, so a request that
 *                    reached the gateway and lost its answer may publish twice. Messages
 *                    wait in the queue below meanwhile.
 *                    `echo` works as on a socket: without it, a message equal to the last
 *                    one this page sent as text does not come back (binary ones may).
 *   Requests go with the page's cookies (`credentials: 'include'`, EventSource
 *   withCredentials for another origin). Heartbeats (heartbeat_msg) are WebSocket frames;
 *   the gateway keeps an event stream alive with comments of its own.
 *
 * Resume (an addition): every transport tells the helper the id of each publication on
 *   a facility with history (`[[facility]] history`), and it remembers the newest one
 *   per key (`broadcast`, `user`, `session`, `group:<name>`). An event stream or a poll
 *   always starts from there, so a page that changes transport or reconnects misses
 *   nothing; a WebSocket does only with `resume`:
 *   resume: true     the socket offers the gateway's envelope (subprotocol `wsrelay.v1`)
 *                    and reconnects with `last-id=<key>:<id>,...` added to the URL, so the
 *                    gateway first replays what the page missed, in order, once. Pages
 *                    that do not set it (nor `shared`) reconnect as ws4redis.js did, and get
 *                    the stored message again. receive_message always gets the plain
 *                    payload: a string, or a Blob for a binary one (as for a binary frame
 *                    without the envelope). Ids the page kept from an earlier visit may be
 *                    given in `uri` as a `last-id=` parameter.
 *   on_resumed(key, count)  optional: `count` missed messages of `key` were replayed
 *                    (they went to receive_message just before).
 *   on_reset(key, reason)   optional: what `key` missed cannot be replayed (reason
 *                    "history too short", "history expired", "history lost", "unknown id";
 *                    or "resume failed" when the helper gave up offering its ids after 8
 *                    attempts in a row that never opened, as a gateway refuses a key the
 *                    page no longer listens to). The key's stored message, if any,
 *                    follows through receive_message.
 *   on_gap(key, reason)     optional: messages of `key`, a key without history, may have
 *                    been missed (reason "the link to redis was lost"); its stored message
 *                    follows.
 *   on_subscribed(keys)     optional: the subscriptions are live (after each connect,
 *                    before its stored or replayed messages): from here on nothing
 *                    published on `keys` is missed.
 *   These callbacks come whenever the transport carries them: over sse, over poll (but
 *   for on_subscribed and on_resumed: every poll resumes, and the ids say it), and over
 *   a WebSocket whose gateway chose the envelope (offered with resume, shared, or more
 *   than one transport). A gateway that does not choose it is spoken to as without.
 *
 * Tabs sharing one connection (an addition):
 *   shared: true     every tab of this origin that opens the same uri with `shared` uses
 *                    one connection: the tab that holds a Web Lock (navigator.locks; in
 *                    browsers without it, the tabs elect one over a BroadcastChannel)
 *                    connects and passes everything it receives to the others over a
 *                    BroadcastChannel, and their send_message goes out through it (with
 *                    the options of the tab that holds the connection). All
 *                    callbacks are called in every tab, each with its own `echo`. A tab
 *                    that joins gets the newest message of each key the connection
 *                    received (as a late joiner gets the stored one). Every tab keeps the
 *                    ids, and the connection always resumes (as with `resume`): when the
 *                    connected tab closes, the next one connects with them, its tabs see
 *                    disconnected() then connected(), and on a facility with history
 *                    nothing is lost. A message sent by another tab in the moment the
 *                    connected one closes can be lost. Without BroadcastChannel, each
 *                    tab connects on its own.
 *
 * The returned object (with or without `new`):
 *   send_message(msg)  sends now when connected (returns true); otherwise queues the
 *                      message for the next connection (returns false). Throws an Error
 *                      when the queue is full or after close(). Over sse and poll, true
 *                      means its POST started at once. In a tab that shares another's
 *                      connection, true means it was handed over while that is open.
 *   get_state()        0 connecting, 1 open, 2 closing, 3 closed (which includes waiting
 *                      to reconnect): the WebSocket readyState, or the same for the other
 *                      transports and for the shared connection.
 *   is_connecting(), is_connected(), is_closing(), is_closed(): the same, as booleans.
 *   get_transport()    see above.
 *   close()            closes for good: no reconnection, queued messages are dropped.
 *                      In the tab holding a shared connection, another tab takes it over.
 *   get_last_ids()     the newest id per key ({broadcast: '1700000000000-0'}), to keep
 *                      for a later visit; {} when none is known.
 *
 * How it behaves, where ws4redis.js did less:
 *   Reconnection     after every close that close() did not ask for. The wait before
 *                    attempt n (n = 0, 1, 2, ...) is random in [0, min(30 s, 500 ms * 2^n)]
 *                    ("full jitter": after a gateway restart, thousands of pages do not all
 *                    come back in the same second). n goes back to 0 when a connection had
 *                    stayed open 5 s or more, so a gateway that accepts and drops sockets
 *                    at once still sees growing waits. The browser's `online` event
 *                    reconnects at once. The same holds for every transport; after a
 *                    close with code 1013 (try again later: the gateway refuses event
 *                    streams for a while, full or stopping) the wait is 2 to 10 s at
 *                    least, as the gateway asks.
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
 *   disconnected(evt) gets a real CloseEvent from a WebSocket; otherwise an object with
 *                    the same type ('close'), code, reason and wasClean: 1006 when an event
 *                    stream or a poll failed, the gateway's code when it ended the stream
 *                    on purpose (1001 shutting down, 4000 slow consumer, ...).
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
    var CONNECTING = 0;
    var OPEN = 1;
    var CLOSED = 3;
    var SUBPROTOCOL = 'wsrelay.v1';
    // Attempts in a row that offered ids and never opened before the helper forgets them.
    var RESUME_ATTEMPTS = 8;
    var TRANSPORTS = ['websocket', 'sse', 'poll'];
    // Failed attempts in a row before a transport that never worked is left.
    var FALLBACK_AFTER = 2;
    var SILENCE_MS = 10000;
    var TRY_AGAIN_LATER = 1013;
    // The longest a poll may wait for its answer (the gateway's poll_timeout is 25 s).
    var POLL_LIMIT_MS = 60000;
    // Shared connections without Web Locks: the connected tab's beacon, and how long a
    // tab that claims the connection waits for objections.
    var BEAT_MS = 1000;
    var CLAIM_MS = 300;

    function isFunction(f) {
        return typeof f === 'function';
    }

    // Reports an error where the page's console and error handlers see it, without
    // stopping the helper.
    function rethrow(e) {
        setTimeout(function () { throw e; }, 0);
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

    // `url` as what comes before its query and the query's parameters, as written.
    function splitUrl(url) {
        var q = url.indexOf('?');
        if (q < 0) {
            return { base: url, params: [] };
        }
        return {
            base: url.slice(0, q),
            params: url.slice(q + 1).split('&').filter(function (p) { return p !== ''; })
        };
    }

    function joinUrl(base, params) {
        return params.length > 0 ? base + '?' + params.join('&') : base;
    }

    function paramName(param) {
        var eq = param.indexOf('=');
        return (eq < 0 ? param : param.slice(0, eq)).toLowerCase();
    }

    // `url` with `name=value` added (value percent-encoded).
    function withParam(url, name, value) {
        var parts = splitUrl(url);
        return joinUrl(parts.base, parts.params.concat([name + '=' + encodeURIComponent(value)]));
    }

    // `url` with the flag `name` (a parameter without value) added.
    function withFlag(url, name) {
        var parts = splitUrl(url);
        return joinUrl(parts.base, parts.params.concat([name]));
    }

    // Adds to `ids` the items of a `<label>:<id>,...` list; items that do not read so are
    // left out. Labels may contain ':' (group:<name>): the id follows the last one.
    function readIds(list, ids) {
        list.split(',').forEach(function (item) {
            var colon = item.lastIndexOf(':');
            if (colon > 0 && colon < item.length - 1) {
                ids[item.slice(0, colon)] = item.slice(colon + 1);
            }
        });
    }

    // Splits `url` into the URL without its `last-id` parameters and the ids they give.
    function takeLastIds(url) {
        var ids = {};
        var parts = splitUrl(url);
        var kept = parts.params.filter(function (param) {
            if (paramName(param) !== 'last-id') {
                return true;
            }
            var eq = param.indexOf('=');
            if (eq >= 0) {
                try {
                    readIds(decodeURIComponent(param.slice(eq + 1)), ids);
                } catch (e) {
                    // Not percent-encoded text: no ids.
                }
            }
            return false;
        });
        return { url: joinUrl(parts.base, kept), ids: ids };
    }

    // `<label>:<id>,...` for `ids`; the long-poll's tokens of keys without history (they
    // start with '~') only when `tokens`: the other transports take stream ids only.
    function idList(ids, tokens) {
        return Object.keys(ids).filter(function (label) {
            return tokens || ids[label].charAt(0) !== '~';
        }).map(function (label) {
            return label + ':' + ids[label];
        }).join(',');
    }

    // Whether stream id `a` (`<ms>-<seq>`) comes after `b`; true when either is no such id.
    function isNewer(a, b) {
        var x = /^(\d+)-(\d+)$/.exec(a);
        var y = /^(\d+)-(\d+)$/.exec(b);
        if (x === null || y === null) {
            return true;
        }
        return Number(x[1]) > Number(y[1]) ||
            (x[1] === y[1] && Number(x[2]) > Number(y[2]));
    }

    // The URLs of the event stream, the long-poll and the publishing endpoint, from the
    // socket URL (without last-id): its path's `websocket_url` prefix replaced; null when
    // the path does not start with it.
    function endpoints(url, options) {
        var m = /^(wss?):\/\/([^\/?#]+)([^?#]*)/i.exec(url);
        var prefix = options.websocket_url || '/ws/';
        if (m === null || m[3].indexOf(prefix) !== 0) {
            return null;
        }
        var scheme = m[1].toLowerCase() === 'wss' ? 'https:' : 'http:';
        var rest = m[3].slice(prefix.length);
        var params = splitUrl(url.split('#')[0]).params;
        function at(path, keep) {
            var base = /^https?:\/\//i.test(path) ? path
                : path.slice(0, 2) === '//' ? scheme + path : scheme + '//' + m[2] + path;
            return joinUrl(base + rest, params.filter(function (p) {
                return keep(paramName(p));
            }));
        }
        function receives(name) {
            return name.indexOf('publish-') !== 0;
        }
        function publishes(name) {
            return name.indexOf('subscribe-') !== 0 && name !== 'echo';
        }
        return {
            sse: at(options.sse_url || '/sse/', receives),
            poll: at(options.poll_url || '/poll/', receives),
            pub: at(options.pub_url || '/pub/', publishes)
        };
    }

    // Whether `url` is of another origin than the page.
    function crossOrigin(url) {
        if (typeof location === 'undefined') {
            return false;
        }
        var m = /^(https?:\/\/[^\/?#]+)/i.exec(url);
        return m !== null && m[1].toLowerCase() !== String(location.origin).toLowerCase();
    }

    // The transports of `wanted` this browser and uri can use, in order.
    function usable(wanted, ends) {
        var names = wanted === undefined ? TRANSPORTS : wanted;
        if (!Array.isArray(names)) {
            throw new Error('WS4Redis: `transports` must be an array');
        }
        return names.filter(function (name, i) {
            if (TRANSPORTS.indexOf(name) < 0) {
                throw new Error('WS4Redis: unknown transport ' + JSON.stringify(name) +
                    ' (known: ' + TRANSPORTS.join(', ') + ')');
            }
            if (names.indexOf(name) !== i) {
                return false;
            }
            if (name === 'websocket') {
                return typeof WebSocket !== 'undefined';
            }
            return ends !== null && (name === 'sse'
                ? typeof EventSource !== 'undefined' : typeof fetch === 'function');
        });
    }

    // The payload of a `data_base64` envelope or a binary event: a Blob, as a binary
    // frame gives.
    function binaryPayload(base64) {
        var raw = atob(base64);
        var bytes = new Uint8Array(raw.length);
        for (var i = 0; i < raw.length; i++) {
            bytes[i] = raw.charCodeAt(i);
        }
        return typeof Blob === 'function' ? new Blob([bytes]) : bytes.buffer;
    }

    // A close event for a connection that ended without a WebSocket close frame.
    function closeEvent(code, reason, wasClean) {
        var init = { code: code, reason: reason, wasClean: wasClean === true };
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

    function parseJson(text) {
        try {
            var value = JSON.parse(text);
            return value !== null && typeof value === 'object' ? value : null;
        } catch (e) {
            return null;
        }
    }

    // One connection with its transports, fallback, reconnection, heartbeats and outgoing
    // queue. What happens goes to `sink` as plain objects (they cross a BroadcastChannel
    // when the connection is shared): {type: 'connecting' | 'connected', transport},
    // {type: 'disconnected', event}, {type: 'message', data, key, id}, and the envelope's
    // control messages ({type: 'resumed', key, count}, ...). `cfg.ids()` gives the ids
    // to resume from; `cfg.start` and `cfg.worked` where an earlier connection left off.
    function Link(cfg, sink) {
        var order = cfg.transports;
        var at = Math.max(0, order.indexOf(cfg.start));
        var worked = cfg.worked || {};  // transports that carried something in this page
        var failures = 0;               // failed attempts in a row on a transport never worked
        var failedResumes = 0;          // attempts in a row that offered ids and never opened
        var conn = null;                // the current attempt, null while waiting to reconnect
        var stopped = false;
        var attempt = 0;                // reconnection attempts since the last stable connection
        var reconnectTimer = null;
        var heartbeatTimer = null;
        var silenceTimer = null;
        var missedHeartbeats = 0;
        var openedAt = 0;
        var queue = [];
        var posting = false;            // a POST is on its way
        var postAttempt = 0;
        var postTimer = null;
        var canFall = order.length > 1;

        function backoff(n) {
            return Math.random() * Math.min(RECONNECT_CAP_MS, RECONNECT_BASE_MS * Math.pow(2, n));
        }

        function connect() {
            reconnectTimer = null;
            if (stopped) {
                return;
            }
            var name = order[at];
            sink({ type: 'connecting', transport: name });
            if (stopped || conn !== null) {
                return; // connecting() called close()
            }
            var a = { name: name, state: CONNECTING, opened: false, proven: false, offered: false };
            conn = a;
            try {
                (name === 'websocket' ? openSocket : name === 'sse' ? openStream : openPoll)(a);
            } catch (e) {
                conn = null;
                scheduleReconnect();
                rethrow(e);
                return;
            }
            pump();
        }

        // The attempt's connection is up: queued messages go out, then connected().
        function opened(a) {
            if (a !== conn || a.opened) {
                return;
            }
            a.opened = true;
            a.state = OPEN;
            failedResumes = 0;
            openedAt = Date.now();
            if (a.name === 'websocket') {
                missedHeartbeats = 0;
                if (cfg.heartbeatMsg !== null) {
                    heartbeatTimer = setInterval(beat, cfg.heartbeatInterval);
                }
                while (queue.length > 0 && a.ws.readyState === OPEN) {
                    a.ws.send(queue.shift());
                }
            }
            sink({ type: 'connected', transport: a.name });
        }

        // Something arrived: the path works.
        function proved(a) {
            if (!a.proven) {
                a.proven = true;
                worked[a.name] = true;
                failures = 0;
                clearTimeout(silenceTimer);
            }
        }

        function received(a, ev) {
            if (a === conn) {
                proved(a);
                sink(ev);
            }
        }

        // A message or control object of the envelope (WebSocket text frame, `wsrelay`
        // event, poll answer element).
        function envelope(a, m) {
            if (m.type === 'message') {
                var data = typeof m.data === 'string' ? m.data
                    : typeof m.data_base64 === 'string' ? binaryPayload(m.data_base64) : null;
                if (data !== null) {
                    received(a, { type: 'message', data: data, key: m.key, id: m.id });
                }
            } else if (m.type === 'close') {
                a.closing = m;
                proved(a);
            } else {
                received(a, m);
            }
        }

        function watch(a) {
            if (canFall && !worked[a.name]) {
                clearTimeout(silenceTimer);
                silenceTimer = setTimeout(function () {
                    if (a === conn && !a.proven) {
                        a.close(4001, 'nothing received');
                        ended(a, closeEvent(1006, 'nothing received'), true);
                    }
                }, cfg.silence);
            }
        }

        // The attempt is over: decides on fallback, schedules the next one, tells the page.
        function ended(a, evt, silent) {
            if (a !== conn) {
                return;
            }
            conn = null;
            a.state = CLOSED;
            stopHeartbeat();
            clearTimeout(silenceTimer);
            if (openedAt !== 0 && Date.now() - openedAt >= STABLE_AFTER_MS) {
                attempt = 0;
            }
            openedAt = 0;
            if (a.offered && !a.opened) {
                resumeFailed();
            }
            if (!a.proven && canFall && !worked[a.name]) {
                failures += 1;
                if (silent || failures >= FALLBACK_AFTER) {
                    failures = 0;
                    at = (at + 1) % order.length;
                }
            }
            if (!stopped) {
                // 1013, "try again later": the gateway refused an event stream for a
                // while (full, stopping) and asks for a wait of 2 to 10 s, as its
                // `retry:` tells EventSource; on a socket, Redis is away.
                scheduleReconnect(evt.code === TRY_AGAIN_LATER ? 2000 + Math.random() * 8000 : 0);
            }
            sink({ type: 'disconnected', event: evt });
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
            Object.keys(cfg.ids()).forEach(function (label) {
                sink({ type: 'reset', key: label, reason: 'resume failed', forget: true });
            });
        }

        function scheduleReconnect(least) {
            var wait = Math.max(least || 0, backoff(attempt));
            attempt += 1;
            reconnectTimer = setTimeout(connect, wait);
        }

        function openSocket(a) {
            var url = cfg.wsUrl;
            var ids = cfg.resume ? idList(cfg.ids(), false) : '';
            if (ids !== '') {
                url = withParam(url, 'last-id', ids);
                a.offered = true;
            }
            var ws = cfg.envelope ? new WebSocket(url, [SUBPROTOCOL]) : new WebSocket(url);
            a.ws = ws;
            ws.onopen = function () {
                if (a !== conn) {
                    return;
                }
                if (ws.protocol === SUBPROTOCOL) {
                    watch(a); // its first frame is `subscribed`
                } else {
                    proved(a); // nothing to wait for
                }
                opened(a);
            };
            ws.onmessage = function (evt) {
                if (a !== conn) {
                    return;
                }
                missedHeartbeats = 0;
                if (evt.data === cfg.heartbeatMsg) {
                    proved(a);
                    return;
                }
                var m = typeof evt.data === 'string' && ws.protocol === SUBPROTOCOL
                    ? parseJson(evt.data) : null;
                if (m !== null && typeof m.type === 'string') {
                    envelope(a, m);
                } else {
                    received(a, { type: 'message', data: evt.data });
                }
            };
            ws.onclose = function (evt) {
                ended(a, evt);
            };
            // An error is always followed by a close event, which does the work.
            ws.onerror = function () {};
            a.close = function (code, reason) {
                ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
                try {
                    ws.close(code, reason);
                } catch (e) {
                    // Closing a dead socket may fail; it is abandoned either way.
                }
            };
        }

        function openStream(a) {
            var url = cfg.sseUrl;
            var ids = idList(cfg.ids(), false);
            if (ids !== '') {
                url = withParam(url, 'lastEventId', ids);
                a.offered = true;
            }
            var es = new EventSource(url, { withCredentials: crossOrigin(url) });
            var lastId = '';
            // The key and id an event carried: EventSource repeats the last id on events
            // that have none, so only a changed one is new.
            function message(e, data) {
                var ev = { type: 'message', data: data };
                if (e.lastEventId && e.lastEventId !== lastId) {
                    lastId = e.lastEventId;
                    var colon = lastId.lastIndexOf(':');
                    if (colon > 0) {
                        ev.key = lastId.slice(0, colon);
                        ev.id = lastId.slice(colon + 1);
                    }
                }
                received(a, ev);
            }
            es.onopen = function () {
                opened(a);
            };
            es.onmessage = function (e) {
                message(e, e.data);
            };
            es.addEventListener('binary', function (e) {
                message(e, binaryPayload(e.data));
            });
            es.addEventListener('wsrelay', function (e) {
                var m = parseJson(e.data);
                if (a === conn && m !== null) {
                    envelope(a, m);
                }
            });
            // EventSource would reconnect by itself with only the last id: the helper
            // does, with all of them.
            es.onerror = function () {
                es.close();
                var c = a.closing;
                ended(a, c ? closeEvent(c.code, c.reason, true) : closeEvent(1006, 'the event stream failed'));
            };
            a.close = function () {
                es.close();
            };
            watch(a);
        }

        function openPoll(a) {
            var abort = function () {};
            function poll() {
                var url = cfg.pollUrl;
                var ids = idList(cfg.ids(), true);
                if (ids !== '') {
                    url = withParam(url, 'since', ids);
                    a.offered = a.offered || !a.opened;
                }
                var ctrl = typeof AbortController === 'function' ? new AbortController() : null;
                var limit = setTimeout(function () {
                    abort();
                    ended(a, closeEvent(1006, 'the poll got no answer'));
                }, POLL_LIMIT_MS);
                abort = function () {
                    clearTimeout(limit);
                    if (ctrl !== null) {
                        ctrl.abort();
                    }
                };
                fetch(url, {
                    credentials: 'include',
                    cache: 'no-store',
                    signal: ctrl === null ? undefined : ctrl.signal
                }).then(function (r) {
                    if (a !== conn) {
                        return null;
                    }
                    if (r.status !== 200) {
                        return r.text().then(function (text) {
                            throw new Error('HTTP ' + r.status + (text ? ': ' + text.slice(0, 100) : ''));
                        });
                    }
                    opened(a);
                    return r.json();
                }).then(function (list) {
                    clearTimeout(limit);
                    if (a !== conn || list === null) {
                        return;
                    }
                    if (!Array.isArray(list)) {
                        throw new Error('the poll answer is not a JSON array');
                    }
                    proved(a);
                    for (var i = 0; i < list.length && a === conn; i++) {
                        if (list[i] !== null && typeof list[i] === 'object') {
                            envelope(a, list[i]);
                        }
                    }
                    if (a === conn) {
                        poll();
                    }
                }).catch(function (e) {
                    clearTimeout(limit);
                    ended(a, closeEvent(1006, 'the poll failed: ' + (e && e.message)));
                });
            }
            a.close = function () {
                abort();
            };
            poll();
        }

        // Over sse and poll: POSTs the queued messages one after the other.
        function pump() {
            if (posting || stopped || queue.length === 0 || order[at] === 'websocket') {
                return false;
            }
            posting = true;
            fetch(cfg.pubUrl, {
                method: 'POST',
                body: queue[0],
                credentials: 'include',
                cache: 'no-store'
            }).then(function (r) {
                return r.text().then(function (text) {
                    return r.ok ? '' : r.status >= 500 ? null : 'HTTP ' + r.status + ': ' + text;
                });
            }, function () {
                return null;
            }).then(function (refused) {
                posting = false;
                if (stopped) {
                    return;
                }
                if (refused === null) {
                    postTimer = setTimeout(pump, backoff(postAttempt));
                    postAttempt += 1;
                    return;
                }
                postAttempt = 0;
                queue.shift();
                if (refused !== '') {
                    rethrow(new Error('WS4Redis: the gateway refused a message (' + refused + ')'));
                }
                pump();
            });
            return true;
        }

        function beat() {
            var a = conn;
            if (a === null || a.name !== 'websocket' || a.ws.readyState !== OPEN) {
                return;
            }
            if (missedHeartbeats >= MAX_MISSED_HEARTBEATS) {
                // Not waiting for a close handshake, which on a dead network path could
                // take minutes.
                a.close(4001, 'missed heartbeats');
                ended(a, closeEvent(1006, 'missed heartbeats'));
                return;
            }
            missedHeartbeats += 1;
            a.ws.send(cfg.heartbeatMsg);
        }

        function stopHeartbeat() {
            if (heartbeatTimer !== null) {
                clearInterval(heartbeatTimer);
                heartbeatTimer = null;
            }
        }

        connect();

        return {
            send: function (message) {
                var a = conn;
                if (order[at] !== 'websocket') {
                    if (!cfg.publishes) {
                        return true; // a socket without publish flags publishes nothing
                    }
                } else if (a !== null && a.name === 'websocket' && a.ws.readyState === OPEN &&
                        queue.length === 0) {
                    a.ws.send(message);
                    return true;
                }
                if (queue.length >= cfg.queueLimit) {
                    throw new Error('WS4Redis: not connected and ' + cfg.queueLimit +
                        ' messages already wait to be sent');
                }
                queue.push(message);
                return pump();
            },
            state: function () {
                var a = conn;
                return a === null ? CLOSED : a.name === 'websocket' ? a.ws.readyState : a.state;
            },
            transport: function () {
                return order[at];
            },
            online: function () {
                if (!stopped && conn === null) {
                    clearTimeout(reconnectTimer);
                    attempt = 0;
                    connect();
                }
            },
            stop: function () {
                stopped = true;
                queue = [];
                clearTimeout(reconnectTimer);
                clearTimeout(postTimer);
                stopHeartbeat();
                clearTimeout(silenceTimer);
                var a = conn;
                if (a !== null && a.name === 'websocket') {
                    a.ws.close(1000); // its close event calls disconnected()
                } else if (a !== null) {
                    a.close();
                    ended(a, closeEvent(1000, '', true));
                }
            }
        };
    }

    function WS4Redis(options, $) {
        if (!options || typeof options.uri !== 'string' || options.uri === '') {
            throw new Error('WS4Redis: the option `uri` (the socket URL) is required');
        }
        void $; // ws4redis.js wanted jQuery here; nothing is needed.

        var given = takeLastIds(socketUrl(options.uri));
        var ids = given.ids;        // the newest id per key label
        var shared = options.shared === true && typeof BroadcastChannel === 'function';
        var resume = options.resume === true || shared;
        var ends = endpoints(given.url, options);
        var transports = usable(options.transports, ends);
        if (transports.length === 0) {
            throw new Error('WS4Redis: none of the transports can be used here (the uri\'s ' +
                'path must start with websocket_url for sse and poll)');
        }
        var params = splitUrl(given.url).params.map(paramName);
        var echo = params.indexOf('echo') >= 0;
        var publishes = params.some(function (name) { return name.indexOf('publish-') === 0; });
        var wsUrl = resume ? given.url : socketUrl(options.uri);
        var cfg = {
            transports: transports,
            // A shared socket hears its own messages: each tab filters its own echo.
            wsUrl: shared && !echo ? withFlag(wsUrl, 'echo') : wsUrl,
            envelope: resume || transports.length > 1,
            resume: resume,
            sseUrl: ends && ends.sse,
            pollUrl: ends && ends.poll,
            pubUrl: ends && ends.pub,
            publishes: publishes,
            ids: function () { return ids; },
            heartbeatMsg: options.heartbeat_msg || null,
            heartbeatInterval: options.heartbeat_interval > 0
                ? options.heartbeat_interval : HEARTBEAT_INTERVAL_MS,
            queueLimit: options.queue_limit > 0 ? options.queue_limit : QUEUE_LIMIT,
            silence: options.transport_timeout > 0 ? options.transport_timeout : SILENCE_MS
        };
        var stopped = false;
        var lastSent = null;        // the last text this page sent, for `echo` off
        var link = null;            // the connection, when this tab holds it

        // A page callback that throws must not stop the helper (no reconnect would be
        // scheduled): its error is rethrown on its own.
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
                rethrow(e);
            }
        }

        // What the connection reports, for this page.
        function deliver(ev) {
            switch (ev.type) {
            case 'message':
                if (typeof ev.key === 'string' && typeof ev.id === 'string') {
                    // A change of the tab holding a shared connection may replay one twice.
                    if (shared && ids[ev.key] !== undefined && ev.id.charAt(0) !== '~' &&
                            !isNewer(ev.id, ids[ev.key])) {
                        return;
                    }
                    // A long-poll names a message without id (a plain PUBLISH) with a
                    // token: on a key with history, the stream id says more.
                    if (ev.id.charAt(0) !== '~' || ids[ev.key] === undefined ||
                            ids[ev.key].charAt(0) === '~') {
                        ids[ev.key] = ev.id;
                    }
                }
                if (ev.data === cfg.heartbeatMsg ||
                        (publishes && !echo && lastSent !== null && ev.data === lastSent)) {
                    return;
                }
                call(options.receive_message, ev.data);
                return;
            case 'resumed':
                call(options.on_resumed, ev.key, ev.count);
                return;
            case 'reset':
                // Otherwise the key's id stays: until a newer one arrives, a reconnect is
                // told again that what was missed is not known.
                if (ev.forget) {
                    delete ids[ev.key];
                }
                call(options.on_reset, ev.key, ev.reason);
                return;
            case 'gap':
                call(options.on_gap, ev.key, ev.reason);
                return;
            case 'subscribed':
                call(options.on_subscribed, ev.keys);
                return;
            case 'connecting':
                call(options.connecting);
                return;
            case 'connected':
                call(options.connected);
                return;
            case 'disconnected':
                call(options.disconnected, ev.event);
                return;
            default:
                // A control message of a later version: nothing for this helper.
                return;
            }
        }

        var tab = shared ? sharing() : null;
        if (tab === null) {
            link = Link(cfg, deliver);
        }

        // `shared`: one connection for the tabs of this origin with the same uri. The tab
        // that leads holds it; the others follow over a BroadcastChannel. Messages there:
        // {t: 'ev', ev} the connection's events; {t: 'hello'} a tab joins, {t: 'welcome'}
        // the leader's answer; {t: 'send', msg} a follower's message, {t: 'refused'} the
        // leader could not queue it; {t: 'leader'} a tab took the lead, {t: 'bye'} the
        // leader lets go; without Web Locks also {t: 'beat'} and {t: 'claim'}.
        function sharing() {
            var name = 'wsrelay ' + given.url;
            var channel = new BroadcastChannel(name);
            var me = Math.random().toString(36).slice(2) + Date.now().toString(36);
            var leading = false;
            var welcomed = false;   // this tab has the connection's state
            var leader = false;     // a leading tab is known
            var lead = { state: CLOSED, transport: transports[0], worked: {}, keys: null };
            var newest = {};        // the newest message per key, for tabs that join
            var pending = [];       // sent while no leader is known
            var release = null;
            var abortLock = null;
            var election = null;
            var stepDown = null;    // gives up the lead (two tabs elected)

            function post(m) {
                if (!stopped || m.t === 'bye' || m.t === 'ev') {
                    try {
                        channel.postMessage(m);
                    } catch (e) {
                        // The channel is closed: nobody listens any more.
                    }
                }
            }

            // Keeps what a tab taking the lead, or joining, needs.
            function note(ev) {
                if (ev.type === 'message') {
                    newest[typeof ev.key === 'string' ? ev.key : ''] = ev;
                } else if (ev.type === 'subscribed') {
                    lead.keys = ev.keys;
                } else if (ev.type === 'connecting') {
                    lead.state = CONNECTING;
                    lead.transport = ev.transport;
                } else if (ev.type === 'connected') {
                    lead.state = OPEN;
                    lead.worked[ev.transport] = true;
                } else if (ev.type === 'disconnected') {
                    lead.state = CLOSED;
                }
            }

            function follow(ev) {
                if (ev.type === 'disconnected') {
                    var e = ev.event;
                    ev = { type: 'disconnected', event: closeEvent(e.code, e.reason, e.wasClean) };
                }
                note(ev);
                deliver(ev);
            }

            // The leading tab is gone: its connection too.
            function lost(reason) {
                if (welcomed && lead.state !== CLOSED) {
                    follow({ type: 'disconnected', event: { code: 1001, reason: reason, wasClean: false } });
                }
            }

            function flush() {
                var waiting = pending;
                pending = [];
                waiting.forEach(function (message) {
                    if (leading) {
                        try {
                            link.send(message);
                        } catch (e) {
                            rethrow(e); // the connection's own queue is full
                        }
                    } else {
                        post({ t: 'send', from: me, msg: message });
                    }
                });
            }

            function takeLead() {
                if (stopped || leading) {
                    return;
                }
                leading = true;
                leader = true;
                welcomed = true;
                post({ t: 'leader', from: me });
                var live = true;
                // Where the previous leader's connection left off.
                var settings = { start: lead.transport, worked: lead.worked };
                Object.keys(cfg).forEach(function (name) {
                    settings[name] = settings[name] || cfg[name];
                });
                var mine = Link(settings, function (ev) {
                    if (!live) {
                        return; // a connection this tab gave up (elected twice)
                    }
                    var portable = ev;
                    if (ev.type === 'disconnected') {
                        var e = ev.event;
                        portable = { type: ev.type, event: { code: e.code, reason: e.reason, wasClean: e.wasClean } };
                    }
                    note(portable);
                    deliver(ev);
                    if (leading) {
                        post({ t: 'ev', ev: portable });
                    }
                });
                link = mine;
                stepDown = function () {
                    live = false;
                    leading = false;
                    link = null;
                    mine.stop();
                };
                flush();
            }

            function welcome(to) {
                post({
                    t: 'welcome',
                    to: to,
                    lead: lead,
                    ids: ids,
                    newest: Object.keys(newest).map(function (k) { return newest[k]; })
                });
            }

            channel.onmessage = function (e) {
                var m = e.data;
                if (stopped || m === null || typeof m !== 'object' || m.from === me) {
                    return;
                }
                if (election !== null) {
                    election(m);
                }
                switch (m.t) {
                case 'ev':
                    if (welcomed && !leading) {
                        follow(m.ev);
                    }
                    return;
                case 'hello':
                    if (leading) {
                        welcome(m.from);
                    }
                    return;
                case 'welcome':
                    if (m.to !== me || welcomed) {
                        return;
                    }
                    welcomed = true;
                    leader = true;
                    lead.transport = m.lead.transport;
                    lead.worked = m.lead.worked;
                    if (m.lead.state !== CLOSED) {
                        follow({ type: 'connecting', transport: m.lead.transport });
                    }
                    if (m.lead.state === OPEN) {
                        follow({ type: 'connected', transport: m.lead.transport });
                    }
                    if (m.lead.keys !== null) {
                        follow({ type: 'subscribed', keys: m.lead.keys });
                    }
                    m.newest.forEach(follow);
                    Object.keys(m.ids).forEach(function (label) {
                        if (ids[label] === undefined) {
                            ids[label] = m.ids[label];
                        }
                    });
                    flush();
                    return;
                case 'send':
                    if (leading) {
                        try {
                            link.send(m.msg);
                        } catch (err) {
                            post({ t: 'refused', to: m.from, error: String(err && err.message) });
                        }
                    }
                    return;
                case 'refused':
                    if (m.to === me) {
                        rethrow(new Error(m.error));
                    }
                    return;
                case 'leader':
                    leader = true;
                    if (welcomed) {
                        // The tab that held the connection went away without a word.
                        lost('the tab holding the connection went away');
                        flush();
                    } else {
                        post({ t: 'hello', from: me });
                    }
                    return;
                case 'bye':
                    leader = false;
                    lost('the tab holding the connection closed');
                    return;
                default:
                    return;
                }
            };

            function bye() {
                if (leading) {
                    post({ t: 'bye', from: me });
                }
            }

            if (typeof navigator !== 'undefined' && navigator.locks && isFunction(navigator.locks.request)) {
                abortLock = typeof AbortController === 'function' ? new AbortController() : null;
                navigator.locks.request(name, abortLock === null ? {} : { signal: abortLock.signal }, function () {
                    if (stopped) {
                        return null;
                    }
                    takeLead();
                    return new Promise(function (resolve) {
                        release = resolve;
                    });
                }).catch(function () {
                    // Aborted by close().
                });
            } else {
                election = elect();
            }
            post({ t: 'hello', from: me });
            if (typeof window !== 'undefined' && isFunction(window.addEventListener)) {
                window.addEventListener('pagehide', bye);
            }

            // Without Web Locks: the leader beats every BEAT_MS; a tab that hears no beat
            // for three of them claims the lead, and takes it unless a tab with a smaller
            // id claims too or a leader answers within CLAIM_MS. Two leaders (after a
            // partition): the one with the larger id steps down.
            function elect() {
                var heard = 0;
                var claiming = false;
                var outranked = false;
                function claim() {
                    if (claiming || stopped || leading) {
                        return;
                    }
                    claiming = true;
                    outranked = false;
                    post({ t: 'claim', from: me });
                    setTimeout(function () {
                        claiming = false;
                        if (!outranked && Date.now() - heard > 3 * BEAT_MS) {
                            takeLead();
                        }
                    }, CLAIM_MS);
                }
                var timer = setInterval(function () {
                    if (stopped) {
                        clearInterval(timer);
                    } else if (leading) {
                        post({ t: 'beat', from: me });
                    } else if (Date.now() - heard > 3 * BEAT_MS) {
                        claim();
                    }
                }, BEAT_MS);
                claim();
                return function (m) {
                    if (m.t === 'beat' || m.t === 'leader') {
                        heard = Date.now();
                        if (leading && m.from < me) {
                            stepDown();
                        }
                    } else if (m.t === 'claim') {
                        if (leading) {
                            post({ t: 'beat', from: me });
                        } else if (m.from < me) {
                            outranked = true;
                        }
                    } else if (m.t === 'bye') {
                        heard = 0;
                        claim();
                    }
                };
            }

            return {
                send: function (message) {
                    if (leading) {
                        return link.send(message);
                    }
                    if (leader && welcomed) {
                        post({ t: 'send', from: me, msg: message });
                        return lead.state === OPEN;
                    }
                    if (pending.length >= cfg.queueLimit) {
                        throw new Error('WS4Redis: not connected and ' + cfg.queueLimit +
                            ' messages already wait to be sent');
                    }
                    pending.push(message);
                    return false;
                },
                state: function () {
                    return leading ? link.state() : lead.state;
                },
                transport: function () {
                    return leading ? link.transport() : lead.transport;
                },
                close: function () {
                    if (leading) {
                        link.stop();
                        bye();
                    }
                    if (release !== null) {
                        release();
                    }
                    if (abortLock !== null) {
                        abortLock.abort();
                    }
                    if (typeof window !== 'undefined' && isFunction(window.removeEventListener)) {
                        window.removeEventListener('pagehide', bye);
                    }
                    channel.close();
                }
            };
        }

        function onOnline() {
            if (link !== null) {
                link.online();
            }
        }

        function hasEvents() {
            return typeof window !== 'undefined' && isFunction(window.addEventListener);
        }

        function state() {
            return tab !== null ? tab.state() : link.state();
        }

        if (hasEvents()) {
            window.addEventListener('online', onOnline);
        }

        return {
            send_message: function (message) {
                if (stopped) {
                    throw new Error('WS4Redis: send_message after close()');
                }
                var sent = tab !== null ? tab.send(message) : link.send(message);
                lastSent = typeof message === 'string' ? message : null;
                return sent;
            },
            get_state: state,
            get_transport: function () {
                return tab !== null ? tab.transport() : link.transport();
            },
            get_last_ids: function () {
                var copy = {};
                Object.keys(ids).forEach(function (label) {
                    if (ids[label].charAt(0) !== '~') {
                        copy[label] = ids[label];
                    }
                });
                return copy;
            },
            is_connecting: function () {
                return state() === CONNECTING;
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
                if (hasEvents()) {
                    window.removeEventListener('online', onOnline);
                }
                if (tab !== null) {
                    tab.close();
                } else {
                    link.stop();
                }
            }
        };
    }

    return WS4Redis;
}());

if (typeof window !== 'undefined') {
    window.WS4Redis = WS4Redis;
}
