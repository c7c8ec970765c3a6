// TypeScript declarations of wsrelay's browser helper (/wsrelay.js, /wsrelay.mjs).
// The helper's header comment is its manual; these types follow it.
//
//   import WS4Redis from '/wsrelay.mjs';   // ES module; the classic script sets window.WS4Redis

declare namespace WS4Redis {
    /** The ways to reach the gateway, tried in the order of `Options.transports`. */
    type Transport = 'websocket' | 'sse' | 'poll';

    /**
     * A key's label: `broadcast`, `user`, `session` or `group:<name>`.
     */
    type KeyLabel = string;

    /** What `receive_message` gets: a text message, or a binary one. */
    type Payload = string | Blob | ArrayBuffer;

    /** What `send_message` takes (as `WebSocket.send`, or a POST body). */
    type Message = string | Blob | ArrayBuffer | ArrayBufferView;

    /**
     * The close event `disconnected` gets: a real `CloseEvent` from a WebSocket, an
     * object with the same fields otherwise (1006 for a failed event stream or poll, the
     * gateway's code when it ended a stream on purpose).
     */
    interface CloseInfo {
        readonly type: string;
        readonly code: number;
        readonly reason: string;
        readonly wasClean: boolean;
    }

    interface Options {
        /** The socket's URL: `ws(s)://...`, `http(s)://...` or a path (`/ws/chat?subscribe-broadcast`). */
        uri: string;
        /** Before every connection attempt. */
        connecting?: () => void;
        /** The connection is open. */
        connected?: () => void;
        /** Every close, also of attempts that never opened. */
        disconnected?: (evt: CloseEvent | CloseInfo) => void;
        /** Every message except heartbeats. */
        receive_message?: (msg: Payload) => void;
        /** The gateway's `heartbeat` setting; null (default): no heartbeats. */
        heartbeat_msg?: string | null;
        /** Milliseconds between heartbeats, default 5000. */
        heartbeat_interval?: number;
        /** Messages that may wait for a connection, default 100. */
        queue_limit?: number;
        /** Offer the envelope and reconnect a WebSocket with the last ids. */
        resume?: boolean;
        /** `count` missed messages of `key` were replayed. */
        on_resumed?: (key: KeyLabel, count: number) => void;
        /** What `key` missed cannot be replayed (`reason` says why). */
        on_reset?: (key: KeyLabel, reason: string) => void;
        /** Messages of `key`, a key without history, may have been missed. */
        on_gap?: (key: KeyLabel, reason: string) => void;
        /** The subscriptions are live. */
        on_subscribed?: (keys: KeyLabel[]) => void;
        /** Default ['websocket', 'sse', 'poll']. */
        transports?: Transport[];
        /** The gateway's `websocket_url`, default '/ws/'. */
        websocket_url?: string;
        /** The gateway's `sse_url`, default '/sse/' (a path on the uri's host, or a full URL). */
        sse_url?: string;
        /** The gateway's `poll_url`, default '/poll/'. */
        poll_url?: string;
        /** The gateway's `pub_url`, default '/pub/'. */
        pub_url?: string;
        /** Milliseconds a new transport may stay silent before the next is tried, default 10000. */
        transport_timeout?: number;
        /** One connection for all tabs of this origin with the same uri. */
        shared?: boolean;
    }

    interface Connection {
        /** true: sent now; false: queued for the next connection. Throws when the queue is full or after close(). */
        send_message(msg: Message): boolean;
        /** 0 connecting, 1 open, 2 closing, 3 closed (or waiting to reconnect). */
        get_state(): 0 | 1 | 2 | 3;
        is_connecting(): boolean;
        is_connected(): boolean;
        is_closing(): boolean;
        is_closed(): boolean;
        /** The transport in use, or tried next. */
        get_transport(): Transport;
        /** The newest id per key ({broadcast: '1700000000000-0'}). */
        get_last_ids(): { [key: string]: string };
        /** Closes for good: no reconnection, queued messages are dropped. */
        close(): void;
    }

    /** Callable with or without `new`; the second argument (jQuery for ws4redis.js) is ignored. */
    interface Factory {
        (options: Options, jQuery?: unknown): Connection;
        new (options: Options, jQuery?: unknown): Connection;
    }
}

declare const WS4Redis: WS4Redis.Factory;

declare global {
    interface Window {
        /** Set by the classic script. */
        WS4Redis: WS4Redis.Factory;
    }
}

export default WS4Redis;
export { WS4Redis };
