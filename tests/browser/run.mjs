// Browser tests of wsrelay's helper (/wsrelay.js) and demo page, in Debian's headless
// Chromium driven by playwright-core.
//
//   WSRELAY_BIN=target/debug/wsrelay node tests/browser/run.mjs [letters...]
//
// It starts everything itself and stops only what it started: a redis-server on a free
// port, the gateway (WSRELAY_BIN) on a fixed free port so it can restart it there, and a
// second gateway with default settings (embedded broker, demo page on). Scenario k has
// its own redis-server (append-only file in a temporary directory, so it survives a
// SIGKILL) and two gateways with a history facility (`--config`); scenarios l to o
// start gateways of their own with history on `history/*` (historyGateways), and l and o
// put a small proxy in front of one (Proxy: refuses WebSocket upgrades or carries none of
// their frames, can refuse /sse/, forwards the rest as it streams). The test pages
// of this folder are written into a tab that shows a file of the gateway (see openPage),
// so the gateway's Origin check passes without any setting; /wsrelay.js, /wsrelay.mjs,
// the demo page and the sockets come from the real gateway.
//
// Environment: WSRELAY_BIN (required), WSRELAY_CHROMIUM (default /usr/bin/chromium),
// WSRELAY_ARTIFACTS (default <repo>/target/artifacts; the demo screenshot goes there),
// WSRELAY_NOTES (set: passing scenarios print their notes too).
// Arguments: scenario letters to run (default: all). Every wait is bounded; nothing
// asserts on timings. The last line is "N passed, M failed"; the exit code is 1 when a
// scenario failed or could not run.

import { spawn } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const ROOT = path.resolve(HERE, '..', '..');
const BIN = process.env.WSRELAY_BIN;
const CHROMIUM = process.env.WSRELAY_CHROMIUM || '/usr/bin/chromium';
const ARTIFACTS = path.resolve(ROOT, process.env.WSRELAY_ARTIFACTS || 'target/artifacts');
const TOKEN = 'browser-test-token-0123456789';
const HEARTBEAT = '--heartbeat--';
/** The longest any single expected event may take. */
const WAIT = 15_000;
/** The longest one scenario may take. */
const SCENARIO_LIMIT = 90_000;
/** The longest the whole run may take. */
const RUN_LIMIT = 270_000;

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function log(line) {
  process.stdout.write(`${line}\n`);
}

// ---------------------------------------------------------------------------------------
// Processes this runner started, so that it ends exactly those.

const children = new Set();

function start(command, args, options) {
  const child = spawn(command, args, options);
  children.add(child);
  child.on('exit', () => children.delete(child));
  // A command that cannot start (not installed) reports here instead of crashing the run.
  child.spawnError = null;
  child.on('error', (e) => {
    child.spawnError = e;
    children.delete(child);
  });
  return child;
}

/** Fails at once when `child` could not be started. */
function checkStarted(child, what) {
  if (child.spawnError) {
    throw new Error(`cannot run ${what}: ${child.spawnError.message}`);
  }
}

function killAll() {
  for (const child of children) {
    try {
      child.kill('SIGKILL');
    } catch {
      // Already gone.
    }
  }
}

process.on('exit', killAll);
for (const sig of ['SIGINT', 'SIGTERM']) {
  process.on(sig, () => {
    killAll();
    process.exit(1);
  });
}

/** Waits (bounded) for a child to exit; SIGKILL when it does not. */
async function waitExit(child, ms = WAIT) {
  if (child.exitCode !== null || child.signalCode !== null) {
    return;
  }
  const exited = new Promise((resolve) => child.once('exit', resolve));
  const timer = sleep(ms).then(() => 'timeout');
  if ((await Promise.race([exited, timer])) === 'timeout') {
    child.kill('SIGKILL');
    await exited;
  }
}

function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

/** Polls `check` until it returns a truthy value; fails with `what` after `ms`. */
async function until(what, check, ms = WAIT) {
  const deadline = Date.now() + ms;
  let last;
  for (;;) {
    try {
      last = await check();
      if (last) {
        return last;
      }
    } catch (e) {
      if (e.message.startsWith('cannot run ')) {
        throw e;
      }
      last = e;
    }
    if (Date.now() > deadline) {
      throw new Error(`timed out waiting for ${what}${last ? ` (last: ${describe(last)})` : ''}`);
    }
    await sleep(50);
  }
}

function describe(value) {
  if (value instanceof Error) {
    return value.message;
  }
  return typeof value === 'string' ? value : JSON.stringify(value);
}

function assert(condition, message) {
  if (!condition) {
    throw new Error(message);
  }
}

// ---------------------------------------------------------------------------------------
// Redis: a server of our own and a minimal RESP client.

/** Reads one RESP reply from `buf` at `pos`: [value, next position], or null if incomplete. */
function parseReply(buf, pos = 0) {
  const end = buf.indexOf('\r\n', pos);
  if (end < 0) {
    return null;
  }
  const kind = String.fromCharCode(buf[pos]);
  const line = buf.toString('utf8', pos + 1, end);
  const next = end + 2;
  switch (kind) {
    case '+':
      return [line, next];
    case '-':
      return [new Error(line), next];
    case ':':
      return [Number(line), next];
    case '$': {
      const len = Number(line);
      if (len < 0) {
        return [null, next];
      }
      if (buf.length < next + len + 2) {
        return null;
      }
      return [buf.toString('utf8', next, next + len), next + len + 2];
    }
    case '*': {
      const count = Number(line);
      const items = [];
      let at = next;
      for (let i = 0; i < count; i++) {
        const item = parseReply(buf, at);
        if (!item) {
          return null;
        }
        items.push(item[0]);
        at = item[1];
      }
      return [count < 0 ? null : items, at];
    }
    default:
      throw new Error(`unexpected RESP reply: ${buf.toString('utf8', pos)}`);
  }
}

/** A command as RESP; arguments are strings (or numbers) or Buffers (binary payloads). */
function encodeCommand(args) {
  const parts = [Buffer.from(`*${args.length}\r\n`)];
  for (const arg of args) {
    const bytes = Buffer.isBuffer(arg) ? arg : Buffer.from(String(arg));
    parts.push(Buffer.from(`$${bytes.length}\r\n`), bytes, Buffer.from('\r\n'));
  }
  return Buffer.concat(parts);
}

class Redis {
  constructor(port, args) {
    this.port = port;
    this.args = args;
    this.child = null;
  }

  /** A server on a free port; `extra` arguments win over the defaults (no persistence). */
  static async start(extra = []) {
    const port = await freePort();
    const redis = new Redis(port, [
      '--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', ...extra,
    ]);
    await redis.restart();
    return redis;
  }

  /** Starts the server (again, on the same port) and waits until it answers PING. */
  async restart() {
    assert(this.child === null, 'redis-server is already running');
    const child = start('redis-server', this.args, { stdio: 'ignore' });
    this.child = child;
    await until('redis-server to answer PING', async () => {
      checkStarted(child, 'redis-server (apt-get install redis-server)');
      return (await this.command('PING')) === 'PONG';
    });
  }

  /** SIGKILL, as a crash: no shutdown save, clients see their connections reset. */
  async kill() {
    const child = this.child;
    this.child = null;
    child.kill('SIGKILL');
    await waitExit(child);
  }

  get url() {
    return `redis://127.0.0.1:${this.port}/0`;
  }

  /** One command on a fresh connection; resolves with the reply. */
  command(...args) {
    return new Promise((resolve, reject) => {
      const socket = net.connect(this.port, '127.0.0.1');
      let buf = Buffer.alloc(0);
      const timer = setTimeout(() => {
        socket.destroy();
        reject(new Error(`redis ${args[0]}: no reply`));
      }, WAIT);
      socket.on('error', (e) => {
        clearTimeout(timer);
        reject(e);
      });
      socket.on('data', (chunk) => {
        buf = Buffer.concat([buf, chunk]);
        const reply = parseReply(buf);
        if (reply) {
          clearTimeout(timer);
          socket.end();
          if (reply[0] instanceof Error) {
            reject(reply[0]);
          } else {
            resolve(reply[0]);
          }
        }
      });
      socket.write(encodeCommand(args));
    });
  }

  /** Subscribes to `channel`; `received` collects the messages until `close()`. */
  async subscribe(channel) {
    const socket = net.connect(this.port, '127.0.0.1');
    const sub = { received: [], close: () => socket.destroy() };
    let buf = Buffer.alloc(0);
    let confirm;
    const confirmed = new Promise((resolve) => {
      confirm = resolve;
    });
    socket.on('error', () => {});
    socket.on('data', (chunk) => {
      buf = Buffer.concat([buf, chunk]);
      for (;;) {
        const reply = parseReply(buf);
        if (!reply) {
          break;
        }
        buf = buf.subarray(reply[1]);
        const [kind, , payload] = reply[0];
        if (kind === 'subscribe') {
          confirm();
        } else if (kind === 'message') {
          sub.received.push(payload);
        }
      }
    });
    socket.write(encodeCommand(['SUBSCRIBE', channel]));
    await Promise.race([confirmed, sleep(WAIT).then(() => Promise.reject(new Error('SUBSCRIBE')))]);
    return sub;
  }

  /** Waits until the gateway listens to `channel` (so a PUBLISH now reaches its sockets). */
  async waitSubscribed(channel, count = 1) {
    await until(`a subscriber on ${channel}`, async () => {
      const [, n] = await this.command('PUBSUB', 'NUMSUB', channel);
      return n >= count;
    });
  }

  async stop() {
    const child = this.child;
    if (child === null) {
      return;
    }
    this.child = null;
    child.kill('SIGTERM');
    await waitExit(child);
  }
}

// ---------------------------------------------------------------------------------------
// The gateway binary, on a port of its own that survives restarts.

class Gateway {
  constructor(name, port, settings, args) {
    this.name = name;
    this.port = port;
    this.settings = settings;
    this.args = args;
    this.child = null;
    this.lines = [];
  }

  /** `settings` as WSRELAY__* variables; `args` for the binary (`--config PATH`). */
  static async create(name, settings, args = []) {
    return new Gateway(name, await freePort(), settings, args);
  }

  get origin() {
    return `http://127.0.0.1:${this.port}`;
  }

  get host() {
    return `127.0.0.1:${this.port}`;
  }

  /** Starts the gateway and waits until /ready answers 200. */
  async start() {
    assert(this.child === null, `${this.name} is already running`);
    const env = {
      PATH: process.env.PATH,
      RUST_LOG: 'info',
      WSRELAY__LISTEN: this.host,
      WSRELAY__WORKERS: '2',
      WSRELAY__DRAIN_WINDOW: '0.2',
      ...this.settings,
    };
    const deadline = Date.now() + WAIT;
    for (;;) {
      const child = start(BIN, this.args, { env, stdio: ['ignore', 'ignore', 'pipe'] });
      let rest = '';
      child.stderr.setEncoding('utf8');
      child.stderr.on('data', (text) => {
        const parts = (rest + text).split('\n');
        rest = parts.pop();
        for (const line of parts) {
          this.lines.push(line);
        }
        if (this.lines.length > 400) {
          this.lines.splice(0, this.lines.length - 400);
        }
      });
      this.child = child;
      const ready = await until(`${this.name} to be ready`, async () => {
        checkStarted(child, BIN);
        if (child.exitCode !== null) {
          return 'exited';
        }
        const r = await fetch(`${this.origin}/ready`);
        return r.status === 200 ? 'ready' : null;
      }).catch((e) => e);
      if (ready === 'ready') {
        return;
      }
      this.child = null;
      await waitExit(child, 1000);
      // The port may still be held by the previous process's last connections.
      if (ready !== 'exited' || Date.now() > deadline) {
        throw new Error(`${this.name} did not start: ${describe(ready)}`);
      }
      await sleep(200);
    }
  }

  /** SIGTERM, as a deploy does, and waits (bounded) for the exit. */
  async stop() {
    const child = this.child;
    if (child === null) {
      return;
    }
    this.child = null;
    child.kill('SIGTERM');
    await waitExit(child);
  }

  async restart() {
    await this.stop();
    await this.start();
  }

  async health() {
    const r = await fetch(`${this.origin}/health`);
    return r.json();
  }

  /** Waits until /health answers `status` (200: Redis linked, 503: not). */
  async waitHealth(status) {
    await until(`${this.name}'s /health to answer ${status}`, async () => {
      const r = await fetch(`${this.origin}/health`);
      await r.text();
      return r.status === status;
    });
  }

  /** Waits until the gauge `name` of /metrics reads `value`. */
  async waitGauge(name, value) {
    await until(`${this.name}'s ${name} to read ${value}`, async () => {
      const text = await (await fetch(`${this.origin}/metrics`)).text();
      const line = text.split('\n').find((l) => l.startsWith(`${name} `));
      return line !== undefined && Number(line.split(' ')[1]) === value;
    });
  }

  async waitSockets(count) {
    await until(`${this.name} to hold ${count} socket(s)`, async () => {
      const h = await this.health();
      return h.sockets === count ? h : null;
    });
  }

  async apiPublish(body) {
    const r = await fetch(`${this.origin}/api/publish`, {
      method: 'POST',
      headers: { authorization: `Bearer ${TOKEN}`, 'content-type': 'application/json' },
      body: JSON.stringify(body),
    });
    const text = await r.text();
    assert(r.status === 200, `POST /api/publish answered ${r.status}: ${text}`);
  }

  tail(n = 25) {
    return this.lines.slice(-n);
  }
}

/**
 * Publishes numbered messages ("1", "2", ...) on `facility`'s broadcast through
 * `POST /api/publish`, one after the other, until stopped. `ok` holds the numbers the API
 * accepted (200); `failed` the others (a 503 while Redis is away, a connection error),
 * which a page may or may not receive: a publication can reach Redis and still lose
 * its answer when Redis dies.
 */
class Publisher {
  constructor(gw, facility, pauseMs) {
    this.gw = gw;
    this.facility = facility;
    this.pauseMs = pauseMs;
    this.ok = [];
    this.failed = [];
    this.next = 1;
    this.running = false;
    this.loop = null;
  }

  start() {
    this.running = true;
    this.loop = (async () => {
      while (this.running) {
        const n = this.next++;
        let status = 0;
        try {
          const r = await fetch(`${this.gw.origin}/api/publish`, {
            method: 'POST',
            headers: { authorization: `Bearer ${TOKEN}`, 'content-type': 'application/json' },
            body: JSON.stringify({ facility: this.facility, audiences: { broadcast: true }, message: String(n) }),
            signal: AbortSignal.timeout(WAIT),
          });
          await r.text();
          status = r.status;
        } catch {
          status = 0;
        }
        (status === 200 ? this.ok : this.failed).push(n);
        await sleep(status === 200 ? this.pauseMs : this.pauseMs * 2);
      }
    })();
  }

  /** Waits until `count` more publications than now were accepted. */
  async more(count, what) {
    const target = this.ok.length + count;
    await until(`${count} more accepted publications (${what})`, () => this.ok.length >= target, WAIT * 2);
  }

  async stop() {
    this.running = false;
    await this.loop;
  }
}

/**
 * Gateways (not started) named `names` on `redis`, sharing a `--config` whose facilities
 * `history/*` keep a history; `stop()` stops them and removes the file.
 */
async function historyGateways(redis, names) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'wsrelay-history-'));
  const config = path.join(dir, 'wsrelay.toml');
  fs.writeFileSync(config, '[[facility]]\npattern = "history/*"\nhistory = 1000\nhistory_ttl = 600\n');
  const settings = {
    WSRELAY__REDIS__URL: redis.url,
    WSRELAY__REDIS__RECONNECT_MAX: '0.5',
    WSRELAY__HEARTBEAT: HEARTBEAT,
    WSRELAY__HEARTBEAT_INTERVAL: '0.5',
    WSRELAY__PUBLISH_TOKEN: TOKEN,
    WSRELAY__POLICY__COMPAT: 'true',
  };
  const gateways = [];
  for (const name of names) {
    gateways.push(await Gateway.create(name, settings, ['--config', config]));
  }
  return {
    gateways,
    async stop() {
      await Promise.all(gateways.map((gw) => gw.stop()));
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

/**
 * A proxy in front of a gateway that refuses WebSockets: it answers every Upgrade
 * request with 403 and forwards plain HTTP requests, streaming both ways (an event
 * stream goes through as it comes). With `blockSse` it answers /sse/ with 502. With
 * `silent` it passes upgrades on instead, but drops every frame of the gateway after
 * its 101 answer (a proxy that lets a WebSocket open and carries nothing).
 * `counts` tells what came through: upgrades, sse, poll, pub requests.
 */
class Proxy {
  constructor(server) {
    this.server = server;
    this.blockSse = false;
    this.silent = false;
    this.counts = { upgrades: 0, sse: 0, poll: 0, pub: 0 };
    this.sockets = new Set();
  }

  static async start(gw) {
    const proxy = new Proxy(http.createServer((req, res) => proxy.forward(gw, req, res)));
    const { server } = proxy;
    server.on('upgrade', (req, socket, head) => {
      proxy.counts.upgrades += 1;
      if (proxy.silent) {
        proxy.tunnel(gw, req, socket, head);
        return;
      }
      const body = 'WebSockets are refused here (test proxy)';
      socket.on('error', () => {});
      socket.end(
        `HTTP/1.1 403 Forbidden\r\ncontent-type: text/plain\r\ncontent-length: ${body.length}\r\n` +
          `connection: close\r\n\r\n${body}`,
      );
    });
    server.on('connection', (socket) => {
      proxy.sockets.add(socket);
      socket.on('close', () => proxy.sockets.delete(socket));
    });
    await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
    proxy.port = server.address().port;
    return proxy;
  }

  get origin() {
    return `http://127.0.0.1:${this.port}`;
  }

  forward(gw, req, res) {
    const kind = ['sse', 'poll', 'pub'].find((k) => req.url.startsWith(`/${k}/`));
    if (kind) {
      this.counts[kind] += 1;
    }
    if (kind === 'sse' && this.blockSse) {
      res.writeHead(502, { 'content-type': 'text/plain' });
      res.end('event streams are refused here (test proxy)');
      return;
    }
    const upstream = http.request(
      { host: '127.0.0.1', port: gw.port, method: req.method, path: req.url, headers: req.headers },
      (answer) => {
        res.writeHead(answer.statusCode, answer.headers);
        answer.pipe(res);
      },
    );
    upstream.on('error', () => {
      if (!res.headersSent) {
        res.writeHead(502, { 'content-type': 'text/plain' });
      }
      res.end();
    });
    res.on('close', () => upstream.destroy());
    req.pipe(upstream);
  }

  tunnel(gw, req, socket, head) {
    const upstream = net.connect(gw.port, '127.0.0.1');
    this.sockets.add(upstream);
    const lines = [`${req.method} ${req.url} HTTP/1.1`];
    for (let i = 0; i < req.rawHeaders.length; i += 2) {
      lines.push(`${req.rawHeaders[i]}: ${req.rawHeaders[i + 1]}`);
    }
    upstream.write(`${lines.join('\r\n')}\r\n\r\n`);
    upstream.write(head);
    let answer = Buffer.alloc(0);
    let answered = false;
    upstream.on('data', (chunk) => {
      if (!answered) {
        answer = Buffer.concat([answer, chunk]);
        const end = answer.indexOf('\r\n\r\n');
        if (end >= 0) {
          answered = true;
          socket.write(answer.subarray(0, end + 4));
        }
      }
    });
    socket.pipe(upstream);
    for (const [a, b] of [[socket, upstream], [upstream, socket]]) {
      a.on('error', () => b.destroy());
      a.on('close', () => b.destroy());
    }
  }

  async stop() {
    for (const socket of this.sockets) {
      socket.destroy();
    }
    await new Promise((resolve) => this.server.close(resolve));
  }
}

/**
 * Scenario n: three tabs of one context open the same uri with `shared: true`; without
 * `locks`, the pages hide navigator.locks and the tabs elect over their BroadcastChannel;
 * with `proxied`, they reach the gateway through a proxy that refuses WebSockets, so the
 * shared connection is an event stream.
 */
async function sharedTabs(browser, redis, ctx, locks, proxied) {
  const mode = `${locks ? 'locks' : 'election'}${proxied ? '-sse' : ''}`;
  const setup = await historyGateways(redis, [`shared gateway (${mode})`]);
  const [gw] = setup.gateways;
  let publisher = null;
  let proxy = null;
  try {
    await gw.start();
    const facility = `history/shared-${mode}`;
    proxy = proxied ? await Proxy.start(gw) : null;
    const front = proxy || gw;
    const context = await newContext(browser, front, ctx);
    const pages = [];
    for (let i = 0; i < 3; i++) {
      const page = await openPage(context, front, 'recorder');
      if (!locks) {
        await page.evaluate(() => Object.defineProperty(navigator, 'locks', { value: undefined }));
      }
      await page.evaluate(
        (path) => rec.start(path, { shared: true, heartbeat_msg: '--heartbeat--' }),
        `/ws/${facility}?subscribe-broadcast&publish-broadcast`,
      );
      pages.push(page);
    }
    for (const page of pages) {
      await connectedTimes(page, 1);
      await pageUntil(page, 'the subscription', () => rec.events.includes('subscribed:broadcast'));
    }
    // What each tab opened: sockets (the proxy refuses the leader's two) and streams.
    const opened = async (tabs) => Promise.all(tabs.map((p) => p.evaluate(() => [__tSockets.length, __tStreams.length])));
    const sum = (counts) => counts.reduce((a, [ws, es]) => [a[0] + ws, a[1] + es], [0, 0]);
    const sockets = async () => (await opened(pages)).map(([ws, es]) => ws + es);
    assert(
      JSON.stringify(sum(await opened(pages))) === (proxied ? '[2,1]' : '[1,0]'),
      `one connection for the three tabs, the tabs opened ${JSON.stringify(await opened(pages))}`,
    );
    await gw.waitGauge('wsrelay_sockets', 1);
    const transports = await Promise.all(pages.map((p) => p.evaluate(() => rec.ws.get_transport())));
    assert(
      transports.every((t) => t === (proxied ? 'sse' : 'websocket')),
      `get_transport() in the tabs: ${JSON.stringify(transports)}`,
    );

    publisher = new Publisher(gw, facility, 50);
    publisher.start();
    await publisher.more(5, 'with three tabs');
    const first = publisher.ok.at(-1);
    for (const page of pages) {
      await pageUntil(page, `message ${first}`, (m) => rec.messages.includes(m), String(first));
      const numbers = (await page.evaluate(() => rec.messages)).filter((m) => /^\d+$/.test(m)).map(Number);
      const lost = publisher.ok.filter((n) => n <= first && !numbers.includes(n));
      assert(lost.length === 0, `a tab lost ${JSON.stringify(lost)} before the leading tab closed`);
    }
    // A follower's message goes out through the leading tab's socket.
    const leaderAt = (await sockets()).findIndex((n) => n > 0);
    const follower = pages[(leaderAt + 1) % 3];
    await follower.evaluate(() => rec.send('from a follower'));
    for (const page of pages.filter((p) => p !== follower)) {
      await received(page, 'from a follower');
    }
    // Without `echo` in the uri, its own message does not come back to the follower (the
    // marker published after it arrives first).
    await gw.apiPublish({ facility, audiences: { broadcast: true }, message: 'after the follower' });
    await received(follower, 'after the follower');
    assert(
      !(await follower.evaluate(() => rec.messages.includes('from a follower'))),
      'the follower received its own message back without echo',
    );

    // The leading tab closes while messages go on being published.
    await pages[leaderAt].close();
    const rest = pages.filter((_, i) => i !== leaderAt);
    await publisher.more(10, 'after the leading tab closed');
    for (const page of rest) {
      await connectedTimes(page, 2);
    }
    await publisher.stop();
    const last = publisher.ok.at(-1);
    for (const page of rest) {
      await pageUntil(page, `message ${last}`, (m) => rec.messages.includes(m), String(last), WAIT * 2);
    }
    await gw.apiPublish({ facility, audiences: { broadcast: true }, message: 'end' });
    for (const page of rest) {
      await received(page, 'end');
    }
    await gw.waitGauge('wsrelay_sockets', 1);
    // The next tab connects on the transport that worked, without trying the others.
    assert(
      JSON.stringify(sum(await opened(rest))) === (proxied ? '[0,1]' : '[1,0]'),
      `one new connection for the two tabs left, they opened ${JSON.stringify(await opened(rest))}`,
    );
    for (const page of rest) {
      const seen = await page.evaluate(() => ({ events: rec.events, messages: rec.messages }));
      ctx.notes.push(`tab: ${JSON.stringify(seen.events)}`);
      const numbers = seen.messages.filter((m) => /^\d+$/.test(m)).map(Number);
      const disorder = numbers.findIndex((n, i) => i > 0 && n <= numbers[i - 1]);
      assert(
        disorder < 0,
        `duplicate or out of order at ${disorder}: ${JSON.stringify(numbers.slice(Math.max(0, disorder - 3), disorder + 3))}`,
      );
      const lost = publisher.ok.filter((n) => !numbers.includes(n));
      assert(lost.length === 0, `a tab lost ${lost.length} accepted message(s): ${JSON.stringify(lost.slice(0, 20))}`);
      const notices = seen.events.filter((e) => e.startsWith('reset:') || e.startsWith('gap:'));
      assert(notices.length === 0, `nothing was lost, yet the tab was told: ${JSON.stringify(notices)}`);
      assert(seen.messages.at(-1) === 'end', `the marker comes last: ${JSON.stringify(seen.messages.slice(-3))}`);
    }
    await context.close();
  } catch (e) {
    noteFailure(ctx, [gw], publisher);
    throw e;
  } finally {
    if (publisher) {
      await publisher.stop();
    }
    if (proxy) {
      await proxy.stop();
    }
    await setup.stop();
  }
}

// ---------------------------------------------------------------------------------------
// Browser helpers.

const PAGES = {
  recorder: 'recorder.html',
  module: 'module.html',
  legacy: 'ws4redis-style.html',
};

/** A fresh browser context (its own cookies and storage). */
async function newContext(browser, gw, ctx) {
  const context = await browser.newContext({ viewport: { width: 1100, height: 760 } });
  context.on('page', (page) => watchPage(page, ctx));
  ctx.contexts.push(context);
  return context;
}

/** Keeps the page's console errors and exceptions for the failure report. */
function watchPage(page, ctx) {
  const name = `page ${ctx.pages++}`;
  page.on('console', (m) => {
    if (m.type() === 'error' || m.type() === 'warning') {
      ctx.notes.push(`${name} console.${m.type()}: ${m.text()}`);
    }
  });
  page.on('pageerror', (e) => ctx.notes.push(`${name} exception: ${e.message}`));
}

/**
 * Opens one of this folder's pages under the gateway's origin: the tab first loads a file
 * the gateway serves (/wsrelay.js, shown as text), then the page is written into that
 * document. So the page has the gateway's origin (the Origin check passes as for a page
 * the web application serves on the same host) and, for Chromium's local network access
 * checks, came from the loopback address like the sockets it opens.
 */
async function openPage(context, gw, page) {
  const p = await context.newPage();
  const response = await p.goto(`${gw.origin}/wsrelay.js`, { timeout: WAIT });
  assert(response && response.status() === 200, `GET /wsrelay.js answered ${response && response.status()}`);
  await p.setContent(fs.readFileSync(path.join(HERE, PAGES[page]), 'utf8'), { timeout: WAIT });
  return p;
}

/** Waits until `fn(arg)` is truthy in the page (at most `ms`). */
async function pageUntil(page, what, fn, arg, ms = WAIT) {
  try {
    await page.waitForFunction(fn, arg, { timeout: ms, polling: 50 });
  } catch (e) {
    const state = await page
      .evaluate(() => (window.rec ? { events: rec.events, messages: rec.messages.slice(-10) } : null))
      .catch(() => null);
    throw new Error(`timed out waiting for ${what}${state ? ` (page: ${JSON.stringify(state)})` : ''}`);
  }
}

const connectedTimes = (page, n, ms = WAIT) =>
  pageUntil(page, `connection #${n}`, (k) => rec.count('connected') >= k, n, ms);

const received = (page, msg) =>
  pageUntil(page, `message ${JSON.stringify(msg)}`, (m) => rec.messages.includes(m), msg);

// ---------------------------------------------------------------------------------------
// Scenarios. Each gets `env` (browser, redis, gw: Redis-backed gateway, demo: default
// gateway) and `ctx` (its contexts, diagnostics).


// What a failed scenario leaves for the reader: the last log lines of its gateways and,
// when it had one, what its publisher got accepted and refused.
function noteFailure(ctx, gateways, publisher) {
  for (const gw of gateways) {
    ctx.notes.push(`--- ${gw.name} log (last lines) ---`, ...gw.tail());
  }
  if (publisher) {
    ctx.notes.push(`accepted: ${JSON.stringify(publisher.ok)}`, `refused: ${JSON.stringify(publisher.failed)}`);
  }
}

const scenarios = [
  {
    id: 'a',
    name: 'the helper connects and receives broadcasts from Redis and from the HTTP API',
    async run({ browser, redis, gw }, ctx) {
      const page = await openPage(await newContext(browser, gw, ctx), gw, 'recorder');
      const added = await page.evaluate(() => __tAdded);
      assert(
        JSON.stringify(added) === '["WS4Redis"]',
        `the classic script must add only WS4Redis to the page's globals, added ${JSON.stringify(added)}`,
      );
      await page.evaluate((h) => rec.start('/ws/browser/a?subscribe-broadcast', { heartbeat_msg: h }), HEARTBEAT);
      await connectedTimes(page, 1);
      await redis.waitSubscribed('broadcast:browser/a');
      await redis.command('PUBLISH', 'broadcast:browser/a', 'from redis');
      await received(page, 'from redis');
      await gw.apiPublish({ facility: 'browser/a', audiences: { broadcast: true }, message: 'from the api', expire: 0 });
      await received(page, 'from the api');
      const state = await page.evaluate(() => [rec.ws.get_state(), rec.ws.is_connected()]);
      assert(state[0] === 1 && state[1] === true, `get_state/is_connected: ${state}`);
    },
  },
  {
    id: 'b',
    name: 'the stored message arrives on load',
    async run({ browser, redis, gw }, ctx) {
      await redis.command('SETEX', 'broadcast:browser/b', '60', 'stored before the page opened');
      const page = await openPage(await newContext(browser, gw, ctx), gw, 'recorder');
      await page.evaluate(() => rec.start('/ws/browser/b?subscribe-broadcast'));
      await received(page, 'stored before the page opened');
    },
  },
  {
    id: 'c',
    name: 'the helper survives a gateway restart and receives later messages',
    async run({ browser, redis, gw }, ctx) {
      const page = await openPage(await newContext(browser, gw, ctx), gw, 'recorder');
      await page.evaluate((h) => rec.start('/ws/browser/c?subscribe-broadcast', { heartbeat_msg: h }), HEARTBEAT);
      await connectedTimes(page, 1);
      await gw.stop();
      await pageUntil(page, 'the disconnection', () => rec.count('disconnected') >= 1);
      const first = await page.evaluate(() => rec.events.find((e) => e.startsWith('disconnected')));
      assert(first.startsWith('disconnected:1001'), `a stopping gateway closes with 1001, got ${first}`);
      await gw.start();
      await connectedTimes(page, 2);
      await redis.waitSubscribed('broadcast:browser/c');
      await redis.command('PUBLISH', 'broadcast:browser/c', 'after the restart');
      await received(page, 'after the restart');
    },
  },
  {
    id: 'd',
    name: 'heartbeats keep an idle connection open and never reach the page',
    async run({ browser, redis, gw }, ctx) {
      const page = await openPage(await newContext(browser, gw, ctx), gw, 'recorder');
      // The helper sends a heartbeat every second: unanswered, it would drop the socket
      // after four; the gateway answers them and sends its own every 0.5 s when idle.
      await page.evaluate(
        (h) => rec.start('/ws/browser/d?subscribe-broadcast', { heartbeat_msg: h, heartbeat_interval: 1000 }),
        HEARTBEAT,
      );
      await connectedTimes(page, 1);
      await sleep(5000);
      await redis.waitSubscribed('broadcast:browser/d');
      await redis.command('PUBLISH', 'broadcast:browser/d', 'after a quiet while');
      await received(page, 'after a quiet while');
      const seen = await page.evaluate((h) => ({
        events: rec.events,
        messages: rec.messages,
        heartbeats: __tFrames.filter((f) => f === h).length,
      }), HEARTBEAT);
      assert(seen.heartbeats >= 3, `heartbeats should have reached the socket, saw ${seen.heartbeats}`);
      assert(!seen.messages.includes(HEARTBEAT), `receive_message got a heartbeat: ${JSON.stringify(seen.messages)}`);
      // By default the socket offers the envelope (the helper may fall back to other
      // transports), so the gateway's `subscribed` shows among the events too.
      const connection = seen.events.filter((e) => /^(connecting|connected|disconnected)/.test(e));
      assert(
        JSON.stringify(connection) === '["connecting","connected"]',
        `the idle connection should have stayed open: ${JSON.stringify(seen.events)}`,
      );
    },
  },
  {
    id: 'e',
    name: 'close() stops reconnecting',
    async run({ browser, gw }, ctx) {
      const page = await openPage(await newContext(browser, gw, ctx), gw, 'recorder');
      await page.evaluate(() => rec.start('/ws/browser/e?subscribe-broadcast'));
      await connectedTimes(page, 1);
      await gw.waitSockets(1);
      await page.evaluate(() => rec.ws.close());
      await pageUntil(page, 'the close', () => rec.count('disconnected') === 1 && rec.ws.is_closed());
      await gw.waitSockets(0);
      // A restart and several backoff periods: a helper that still retried would be back.
      await gw.restart();
      await sleep(4000);
      const after = await page.evaluate(() => ({
        events: rec.events,
        sockets: __tSockets.length,
        state: rec.ws.get_state(),
        send: rec.send('too late'),
      }));
      const h = await gw.health();
      assert(h.sockets === 0, `the gateway holds ${h.sockets} socket(s) after close()`);
      assert(after.sockets === 1, `the helper opened ${after.sockets} sockets, expected 1`);
      assert(after.state === 3, `get_state() after close(): ${after.state}`);
      assert(after.events.filter((e) => e === 'connecting').length === 1, `events: ${after.events}`);
      assert(after.send && after.send.error, `send_message after close() must throw, returned ${describe(after.send)}`);
    },
  },
  {
    id: 'f',
    name: 'a page written for ws4redis.js works unchanged',
    async run({ browser, redis, gw }, ctx) {
      const page = await openPage(await newContext(browser, gw, ctx), gw, 'legacy');
      await page.waitForFunction(() => document.getElementById('status').textContent === 'connected', null, {
        timeout: WAIT,
      });
      await page.fill('#text_message', 'typed on an old page');
      await page.click('#send_message');
      // The page subscribes with `echo`, so its own message comes back through Redis.
      await page.locator('#messages li', { hasText: 'typed on an old page' }).waitFor({ timeout: WAIT });
      await redis.waitSubscribed('broadcast:browser/legacy');
      await redis.command('PUBLISH', 'broadcast:browser/legacy', 'pushed by the server');
      await page.locator('#messages li', { hasText: 'pushed by the server' }).waitFor({ timeout: WAIT });
      const texts = await page.locator('#messages li').allTextContents();
      assert(!texts.includes(HEARTBEAT), `the page shows a heartbeat: ${JSON.stringify(texts)}`);
    },
  },
  {
    id: 'g',
    name: 'the demo page shows live chat, notifications between tabs and publications from the server',
    async run({ browser, demo }, ctx) {
      const context = await newContext(browser, demo, ctx);
      const one = await context.newPage();
      await one.goto(`${demo.origin}/`, { timeout: WAIT });
      const two = await context.newPage();
      await two.goto(`${demo.origin}/`, { timeout: WAIT });
      for (const p of [one, two]) {
        for (const id of ['#chat-state', '#notify-state']) {
          await p.locator(`${id}[data-state="connected"]`).waitFor({ timeout: WAIT });
        }
      }
      await one.fill('#chat-text', 'Hello from the first tab');
      await one.press('#chat-text', 'Enter');
      await two.locator('#chat-log li', { hasText: 'Hello from the first tab' }).waitFor({ timeout: WAIT });
      // The sender sees its own line too (echo).
      await one.locator('#chat-log li', { hasText: 'Hello from the first tab' }).waitFor({ timeout: WAIT });
      await two.fill('#chat-text', 'And hello back');
      await two.click('#chat-form button');
      await one.locator('#chat-log li', { hasText: 'And hello back' }).waitFor({ timeout: WAIT });

      // Another browser (another session) opens the demo too: it sees the chat, not the
      // first browser's notifications.
      const stranger = await (await newContext(browser, demo, ctx)).newPage();
      await stranger.goto(`${demo.origin}/`, { timeout: WAIT });
      await stranger.locator('#notify-state[data-state="connected"]').waitFor({ timeout: WAIT });
      const sessions = await Promise.all([one, two, stranger].map((p) => p.evaluate(() => document.cookie)));
      assert(sessions[0] === sessions[1], `tabs of one browser share the session: ${sessions}`);
      assert(sessions[0] !== sessions[2], 'another browser has another session');

      await one.click('#notify-button');
      await two.locator('#notify-log li', { hasText: 'ping #1' }).waitFor({ timeout: WAIT });
      await stranger.locator('#chat-log li', { hasText: 'And hello back' }).waitFor({ timeout: WAIT });
      const leaked = await stranger.locator('#notify-log li', { hasText: 'ping #1' }).count();
      assert(leaked === 0, "another browser's session received this browser's notification");

      // Publish from the server: to everybody on demo/chat, then to this browser's session.
      await one.fill('#push-text', 'Pushed to everybody');
      const curl = await one.locator('#push-curl').textContent();
      assert(
        curl.includes('Bearer $TOKEN') && curl.includes('"message":"Pushed to everybody"') && curl.includes('/api/publish'),
        `the curl command does not follow the form: ${curl}`,
      );
      await one.click('#push-button');
      await one.locator('#push-note', { hasText: 'HTTP 200' }).waitFor({ timeout: WAIT });
      for (const p of [one, two, stranger]) {
        await p.locator('#chat-log li', { hasText: 'Pushed to everybody' }).waitFor({ timeout: WAIT });
      }
      await one.check('input[name="push-to"][value="session"]');
      await one.fill('#push-text', 'Pushed to this browser');
      const session = sessions[0].match(/sessionid=([^;]+)/)[1];
      const redisCli = await one.locator('#push-redis').textContent();
      assert(
        redisCli.includes(`PUBLISH session:${session}:demo/notify 'Pushed to this browser'`),
        `the redis-cli lines do not follow the form: ${redisCli}`,
      );
      await one.click('#push-button');
      for (const p of [one, two]) {
        await p.locator('#notify-log li', { hasText: 'Pushed to this browser' }).waitFor({ timeout: WAIT });
      }
      // The stranger's own push arrives; this browser's never does.
      await stranger.check('input[name="push-to"][value="session"]');
      await stranger.fill('#push-text', 'Pushed to the stranger');
      await stranger.click('#push-button');
      await stranger.locator('#notify-log li', { hasText: 'Pushed to the stranger' }).waitFor({ timeout: WAIT });
      const pushLeaked = await stranger.locator('#notify-log li', { hasText: 'Pushed to this browser' }).count();
      assert(pushLeaked === 0, "another browser's session received this browser's push");
      // Nothing went wrong in the consoles (a 404 shows there as an error).
      const errors = ctx.notes.filter((n) => n.includes('console.error') || n.includes('exception'));
      assert(errors.length === 0, `the demo pages logged errors: ${JSON.stringify(errors)}`);

      fs.mkdirSync(ARTIFACTS, { recursive: true });
      const shot = path.join(ARTIFACTS, 'demo.png');
      await two.screenshot({ path: shot, fullPage: true });
      ctx.notes.push(`screenshot: ${shot}`);
    },
  },
  {
    id: 'h',
    name: 'messages sent while disconnected are queued, delivered after reconnect, and bounded',
    async run({ browser, redis, gw }, ctx) {
      const page = await openPage(await newContext(browser, gw, ctx), gw, 'recorder');
      await page.evaluate(() => rec.start('/ws/browser/h?publish-broadcast'));
      await connectedTimes(page, 1);
      const sub = await redis.subscribe('broadcast:browser/h');
      try {
        await gw.stop();
        await pageUntil(page, 'the disconnection', () => rec.count('disconnected') >= 1);
        const sent = await page.evaluate(() => {
          const results = [];
          for (let i = 1; i <= 101; i++) {
            results.push(rec.send(`queued ${i}`));
          }
          return results;
        });
        const queued = sent.slice(0, 100);
        assert(
          queued.every((r) => r === false),
          `the first 100 should be queued (false): ${JSON.stringify(queued.filter((r) => r !== false))}`,
        );
        assert(sent[100] && sent[100].error, `the 101st must throw, returned ${describe(sent[100])}`);
        await gw.start();
        await connectedTimes(page, 2);
        await until('the queued messages in Redis', () => sub.received.length >= 100);
        const expected = Array.from({ length: 100 }, (_, i) => `queued ${i + 1}`);
        assert(
          JSON.stringify(sub.received) === JSON.stringify(expected),
          `queued messages out of order or duplicated: ${JSON.stringify(sub.received.slice(0, 5))}...`,
        );
        const after = await page.evaluate(() => rec.send('sent while connected'));
        assert(after === true, `send_message while connected should send at once, returned ${describe(after)}`);
        await until('the live message in Redis', () => sub.received.includes('sent while connected'));
      } finally {
        sub.close();
      }
    },
  },
  {
    id: 'i',
    name: 'the helper works as an ES module (/wsrelay.mjs) with a path as uri',
    async run({ browser, redis, gw }, ctx) {
      const page = await openPage(await newContext(browser, gw, ctx), gw, 'module');
      await page.waitForFunction(() => window.__tModule && __tModule.connected, null, { timeout: WAIT });
      assert(await page.evaluate(() => __tModule.sameExport), 'default and named exports differ');
      await redis.waitSubscribed('broadcast:browser/module');
      await redis.command('PUBLISH', 'broadcast:browser/module', 'to the module');
      await page.waitForFunction(() => __tModule.messages.includes('to the module'), null, { timeout: WAIT });
    },
  },
  {
    id: 'j',
    name: 'missed heartbeats drop a silent connection and reconnect',
    async run({ browser, demo }, ctx) {
      // The default gateway has no heartbeat setting: it never answers heartbeats.
      const page = await openPage(await newContext(browser, demo, ctx), demo, 'recorder');
      await page.evaluate(
        (h) => rec.start('/ws/browser/j?subscribe-broadcast', { heartbeat_msg: h, heartbeat_interval: 300 }),
        HEARTBEAT,
      );
      await connectedTimes(page, 2);
      const events = await page.evaluate(() => rec.events);
      assert(
        events.includes('disconnected:1006:missed heartbeats'),
        `the helper should report the missed heartbeats: ${JSON.stringify(events)}`,
      );
      const sent = await page.evaluate(() => __tSockets.length);
      assert(sent >= 2, `expected a new socket, the helper opened ${sent}`);
    },
  },
  {
    id: 'k',
    name: 'a page with resume: true loses nothing across a gateway restart and a Redis restart',
    async run({ browser }, ctx) {
      const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'wsrelay-resume-'));
      const config = path.join(dir, 'wsrelay.toml');
      // history: more than the gateway's downtime plus the helper's backoff can miss at
      // the publisher's pace (about 10 a second).
      fs.writeFileSync(config, '[[facility]]\npattern = "feed/*"\nhistory = 1000\nhistory_ttl = 600\n');
      let redis = null;
      let publisher = null;
      const gateways = [];
      try {
        // Redis keeps the streams across a SIGKILL: append-only file, fsync'ed always.
        redis = await Redis.start(['--appendonly', 'yes', '--appendfsync', 'always', '--dir', dir]);
        const settings = {
          WSRELAY__REDIS__URL: redis.url,
          WSRELAY__REDIS__RECONNECT_MAX: '0.5',
          WSRELAY__HEARTBEAT: HEARTBEAT,
          WSRELAY__HEARTBEAT_INTERVAL: '0.5',
          WSRELAY__PUBLISH_TOKEN: TOKEN,
          WSRELAY__POLICY__COMPAT: 'true',
        };
        // The page's gateway is restarted; the other one publishes meanwhile, so some
        // messages are published while the page is away and only a resume brings them.
        const front = await Gateway.create('resume gateway', settings, ['--config', config]);
        const back = await Gateway.create('publishing gateway', settings, ['--config', config]);
        gateways.push(front, back);
        await Promise.all([front.start(), back.start()]);

        const page = await openPage(await newContext(browser, front, ctx), front, 'recorder');
        await page.evaluate(
          (h) => rec.start('/ws/feed/browser?subscribe-broadcast', { resume: true, heartbeat_msg: h, heartbeat_interval: 1000 }),
          HEARTBEAT,
        );
        await connectedTimes(page, 1);
        const protocol = await page.evaluate(() => __tSockets[0].protocol);
        assert(protocol === 'wsrelay.v1', `the gateway should choose the envelope, chose ${JSON.stringify(protocol)}`);
        await redis.waitSubscribed('broadcast:feed/browser');
        publisher = new Publisher(back, 'feed/browser', 100);
        publisher.start();
        const receivedUpTo = (n, ms = WAIT) =>
          pageUntil(page, `message ${n}`, (m) => rec.messages.includes(m), String(n), ms);
        await publisher.more(5, 'before the restarts');
        await receivedUpTo(publisher.ok.at(-1));

        // 1. The page's gateway restarts; messages go on being published meanwhile.
        await front.stop();
        await pageUntil(page, 'the disconnection', () => rec.count('disconnected') >= 1);
        await publisher.more(5, 'while the page is disconnected');
        const missed = publisher.ok.at(-1);
        await front.start();
        // The helper's backoff may wait up to 16 s after a few refused attempts.
        await connectedTimes(page, 2, WAIT * 2);
        await pageUntil(page, 'the resume', () => rec.events.some((e) => e.startsWith('resumed:')));
        await receivedUpTo(missed);
        const urls = await page.evaluate(() => __tSockets.map((s) => s.url));
        assert(
          /[?&]last-id=broadcast%3A\d+-\d+$/.test(urls[urls.length - 1]) && urls[urls.length - 1].includes('?subscribe-broadcast&'),
          `the reconnection should offer the last id in the query: ${JSON.stringify(urls)}`,
        );

        // 2. Redis dies (SIGKILL) and comes back with its append-only file.
        await publisher.more(5, 'after the gateway restart');
        const failedBefore = publisher.failed.length;
        await redis.kill();
        await front.waitHealth(503);
        await until('a publication refused while Redis is away', () => publisher.failed.length > failedBefore);
        await redis.restart();
        await Promise.all([front.waitHealth(200), back.waitHealth(200)]);
        await publisher.more(5, 'after the Redis restart');
        await publisher.stop();
        const last = publisher.ok.at(-1);
        await receivedUpTo(last, WAIT * 2);
        // A marker published last: whatever was still on its way arrives before it.
        await back.apiPublish({ facility: 'feed/browser', audiences: { broadcast: true }, message: 'end' });
        await pageUntil(page, 'the marker', () => rec.messages.includes('end'));

        const seen = await page.evaluate((h) => ({
          events: rec.events,
          messages: rec.messages,
          ids: rec.ws.get_last_ids(),
          heartbeats: __tFrames.filter((f) => f === h).length,
        }), HEARTBEAT);
        const numbers = seen.messages.slice(0, seen.messages.indexOf('end')).map(Number);
        const ok = new Set(publisher.ok);
        const failed = new Set(publisher.failed);
        ctx.notes.push(
          `published ${publisher.ok.length} (refused ${publisher.failed.length}), received ${numbers.length}; ` +
            `events: ${JSON.stringify(seen.events)}`,
        );
        const disorder = numbers.findIndex((n, i) => i > 0 && n <= numbers[i - 1]);
        assert(
          disorder < 0,
          `duplicate or out of order at ${disorder}: ${JSON.stringify(numbers.slice(Math.max(0, disorder - 3), disorder + 3))}`,
        );
        const lost = publisher.ok.filter((n) => !numbers.includes(n));
        assert(lost.length === 0, `lost ${lost.length} accepted message(s): ${JSON.stringify(lost.slice(0, 20))}`);
        const unknown = numbers.filter((n) => !ok.has(n) && !failed.has(n));
        assert(unknown.length === 0, `received what was never published: ${JSON.stringify(unknown.slice(0, 20))}`);
        const notices = seen.events.filter((e) => e.startsWith('reset:') || e.startsWith('gap:'));
        assert(notices.length === 0, `nothing was lost, yet the page was told: ${JSON.stringify(notices)}`);
        const resumed = seen.events.filter((e) => e.startsWith('resumed:broadcast:')).map((e) => Number(e.split(':')[2]));
        assert(resumed.some((n) => n >= 5), `the resume should have replayed the missed messages: ${JSON.stringify(seen.events)}`);
        const subscribed = seen.events.filter((e) => e === 'subscribed:broadcast').length;
        assert(subscribed >= 2, `every connect should say when it is live: ${JSON.stringify(seen.events)}`);
        assert(/^\d+-\d+$/.test(seen.ids.broadcast || ''), `get_last_ids(): ${JSON.stringify(seen.ids)}`);
        assert(seen.heartbeats > 0 && !seen.messages.includes(HEARTBEAT), 'heartbeats must reach the socket, not the page');

        // A binary payload (plain PUBLISH, no id) reaches the page as a Blob, as without
        // the envelope, and leaves the remembered id alone.
        await redis.command('PUBLISH', 'broadcast:feed/browser', Buffer.from([0xff, 0x00, 0x41]));
        await pageUntil(page, 'the binary message', () => rec.messages.some((m) => m instanceof Blob));
        const binary = await page.evaluate(async () => {
          const blob = rec.messages.find((m) => m instanceof Blob);
          return { bytes: Array.from(new Uint8Array(await blob.arrayBuffer())), ids: rec.ws.get_last_ids() };
        });
        assert(JSON.stringify(binary.bytes) === '[255,0,65]', `binary payload: ${JSON.stringify(binary.bytes)}`);
        assert(binary.ids.broadcast === seen.ids.broadcast, `a message without id changed the ids: ${JSON.stringify(binary.ids)}`);
      } catch (e) {
        noteFailure(ctx, gateways, publisher);
        throw e;
      } finally {
        if (publisher) {
          await publisher.stop();
        }
        await Promise.all(gateways.map((gw) => gw.stop()));
        if (redis) {
          await redis.stop();
        }
        fs.rmSync(dir, { recursive: true, force: true });
      }
    },
  },
  {
    id: 'l',
    name: 'behind a proxy that refuses WebSockets the helper falls back to SSE, and with SSE refused too to long-poll, and receives and sends every message',
    async run({ browser, redis }, ctx) {
      const setup = await historyGateways(redis, ['fallback gateway']);
      const [gw] = setup.gateways;
      let proxy = null;
      try {
        await gw.start();
        proxy = await Proxy.start(gw);
        // Once on SSE, once on long-poll: each time a page opens through the proxy, a
        // stored message tells when its first answer came, then numbered messages and a
        // message of its own (POST /pub/ through the proxy; `echo` brings it back).
        for (const [round, transport] of [[1, 'sse'], [2, 'poll']]) {
          proxy.blockSse = transport === 'poll';
          const facility = `history/fallback-${round}`;
          const before = { ...proxy.counts };
          await gw.apiPublish({ facility, audiences: { broadcast: true }, message: 'stored' });
          const page = await openPage(await newContext(browser, proxy, ctx), proxy, 'recorder');
          await page.evaluate(
            (path) => rec.start(path, { heartbeat_msg: '--heartbeat--' }),
            `/ws/${facility}?subscribe-broadcast&publish-broadcast&echo`,
          );
          await received(page, 'stored');
          await pageUntil(page, `the transport ${transport}`, (t) => rec.ws.get_transport() === t, transport);
          for (let n = 1; n <= 20; n++) {
            await gw.apiPublish({ facility, audiences: { broadcast: true }, message: `${transport} ${n}` });
          }
          await page.evaluate(() => rec.send('sent by the page'));
          await received(page, 'sent by the page');
          // A binary payload, sent by the page (a POST body) and back through `echo`: base64
          // on the wire, a Blob for the page. (Sent through the gateway, it has an id: a
          // plain PUBLISH between two polls would not reach a long-poll.)
          await page.evaluate(() => rec.send(new Uint8Array([0xff, 0x00, 0x41])));
          await pageUntil(page, 'the binary message', () => rec.messages.some((m) => m instanceof Blob));
          const bytes = await page.evaluate(async () =>
            Array.from(new Uint8Array(await rec.messages.find((m) => m instanceof Blob).arrayBuffer())),
          );
          assert(JSON.stringify(bytes) === '[255,0,65]', `binary payload over ${transport}: ${JSON.stringify(bytes)}`);
          await gw.apiPublish({ facility, audiences: { broadcast: true }, message: 'end' });
          await received(page, 'end');
          const seen = await page.evaluate(() => ({
            messages: rec.messages,
            events: rec.events,
            transport: rec.ws.get_transport(),
            sockets: __tSockets.length,
            streams: __tStreams.length,
          }));
          ctx.notes.push(`round ${round}: ${JSON.stringify(seen.events)}; proxy: ${JSON.stringify(proxy.counts)}`);
          const expected = Array.from({ length: 20 }, (_, i) => `${transport} ${i + 1}`);
          const numbered = seen.messages.filter((m) => typeof m === 'string' && m.startsWith(`${transport} `));
          assert(
            JSON.stringify(numbered) === JSON.stringify(expected),
            `every message once and in order over ${transport}: ${JSON.stringify(seen.messages)}`,
          );
          assert(
            seen.messages.filter((m) => m === 'sent by the page').length === 1 &&
              seen.messages.filter((m) => m === 'end').length === 1,
            `the page's own message once: ${JSON.stringify(seen.messages)}`,
          );
          assert(seen.transport === transport, `get_transport(): ${seen.transport}`);
          assert(seen.sockets >= 2, `the helper should have tried the WebSocket twice, opened ${seen.sockets}`);
          assert(proxy.counts.upgrades - before.upgrades >= 2, `upgrades refused: ${JSON.stringify(proxy.counts)}`);
          assert(proxy.counts.pub - before.pub >= 1, `no POST /pub/ went through the proxy: ${JSON.stringify(proxy.counts)}`);
          if (transport === 'poll') {
            assert(seen.streams >= 2, `the helper should have tried SSE twice, opened ${seen.streams} streams`);
            assert(proxy.counts.poll - before.poll >= 1, `no poll went through the proxy: ${JSON.stringify(proxy.counts)}`);
          }
          // Every poll resumes from `since`: the page is not told so for each.
          const resumes = seen.events.filter((e) => e.startsWith('resumed:'));
          assert(resumes.length <= 1, `on_resumed for every poll: ${JSON.stringify(seen.events)}`);
          const connection = seen.events.filter((e) => /^(connected|subscribed)/.test(e));
          assert(connection.includes('connected'), `the page was never told it is connected: ${JSON.stringify(seen.events)}`);
          await page.context().close();
        }
      } catch (e) {
        noteFailure(ctx, [gw]);
        throw e;
      } finally {
        if (proxy) {
          await proxy.stop();
        }
        await setup.stop();
      }
    },
  },
  {
    id: 'm',
    name: 'an SSE page loses nothing and receives nothing twice across a gateway restart (lastEventId)',
    async run({ browser, redis }, ctx) {
      const setup = await historyGateways(redis, ['SSE gateway', 'publishing gateway']);
      const [front, back] = setup.gateways;
      let publisher = null;
      try {
        await Promise.all([front.start(), back.start()]);
        const facility = 'history/sse-resume';
        const page = await openPage(await newContext(browser, front, ctx), front, 'recorder');
        await page.evaluate((path) => rec.start(path, { transports: ['sse'] }), `/ws/${facility}?subscribe-broadcast`);
        await pageUntil(page, 'the subscription', () => rec.events.includes('subscribed:broadcast'));
        publisher = new Publisher(back, facility, 50);
        publisher.start();
        const receivedUpTo = (n, ms = WAIT) =>
          pageUntil(page, `message ${n}`, (m) => rec.messages.includes(m), String(n), ms);
        await publisher.more(5, 'before the restart');
        await receivedUpTo(publisher.ok.at(-1));

        await front.stop();
        await pageUntil(page, 'the disconnection', () => rec.count('disconnected') >= 1);
        await publisher.more(10, 'while the page is disconnected');
        await front.start();
        await connectedTimes(page, 2, WAIT * 2);
        await publisher.more(5, 'after the restart');
        await publisher.stop();
        await receivedUpTo(publisher.ok.at(-1), WAIT * 2);
        await back.apiPublish({ facility, audiences: { broadcast: true }, message: 'end' });
        await received(page, 'end');

        const seen = await page.evaluate(() => ({
          events: rec.events,
          messages: rec.messages,
          ids: rec.ws.get_last_ids(),
          transport: rec.ws.get_transport(),
          streams: __tStreams.map((s) => s.url),
          sockets: __tSockets.length,
        }));
        ctx.notes.push(`events: ${JSON.stringify(seen.events)}`, `streams: ${JSON.stringify(seen.streams)}`);
        const numbers = seen.messages.slice(0, seen.messages.indexOf('end')).map(Number);
        const disorder = numbers.findIndex((n, i) => i > 0 && n <= numbers[i - 1]);
        assert(
          disorder < 0,
          `duplicate or out of order at ${disorder}: ${JSON.stringify(numbers.slice(Math.max(0, disorder - 3), disorder + 3))}`,
        );
        const lost = publisher.ok.filter((n) => !numbers.includes(n));
        assert(lost.length === 0, `lost ${lost.length} accepted message(s): ${JSON.stringify(lost.slice(0, 20))}`);
        assert(seen.transport === 'sse' && seen.sockets === 0, `transport ${seen.transport}, ${seen.sockets} sockets`);
        const last = seen.streams.at(-1);
        assert(
          /[?&]lastEventId=broadcast%3A\d+-\d+$/.test(last),
          `the reconnection should offer the last id in the query: ${JSON.stringify(seen.streams)}`,
        );
        const resumed = seen.events.filter((e) => e.startsWith('resumed:broadcast:')).map((e) => Number(e.split(':')[2]));
        assert(resumed.some((n) => n >= 10), `the resume should have replayed the missed messages: ${JSON.stringify(seen.events)}`);
        const notices = seen.events.filter((e) => e.startsWith('reset:') || e.startsWith('gap:'));
        assert(notices.length === 0, `nothing was lost, yet the page was told: ${JSON.stringify(notices)}`);
        assert(/^\d+-\d+$/.test(seen.ids.broadcast || ''), `get_last_ids(): ${JSON.stringify(seen.ids)}`);
      } catch (e) {
        noteFailure(ctx, setup.gateways, publisher);
        throw e;
      } finally {
        if (publisher) {
          await publisher.stop();
        }
        await setup.stop();
      }
    },
  },
  {
    id: 'n',
    name: 'three tabs with shared: true hold one connection, all receive every message, and closing the leading tab loses nothing (Web Locks, without them, and on SSE)',
    async run({ browser, redis }, ctx) {
      for (const [locks, proxied] of [[true, false], [false, false], [true, true]]) {
        await sharedTabs(browser, redis, ctx, locks, proxied);
      }
    },
  },

  {
    id: 'o',
    name: 'behind a proxy that lets WebSockets open but carries no frame the helper falls back to SSE at once',
    async run({ browser, redis }, ctx) {
      const setup = await historyGateways(redis, ['silent-proxy gateway']);
      const [gw] = setup.gateways;
      let proxy = null;
      try {
        await gw.start();
        proxy = await Proxy.start(gw);
        proxy.silent = true;
        const facility = 'history/silent';
        const page = await openPage(await newContext(browser, proxy, ctx), proxy, 'recorder');
        // transport_timeout shortens the wait for the first frame (10 s by default).
        await page.evaluate(
          (path) => rec.start(path, { transport_timeout: 1000 }),
          `/ws/${facility}?subscribe-broadcast`,
        );
        await pageUntil(page, 'the event stream', () => rec.ws.get_transport() === 'sse' && rec.ws.is_connected());
        await pageUntil(page, 'the subscription', () => rec.events.includes('subscribed:broadcast'));
        for (let n = 1; n <= 5; n++) {
          await gw.apiPublish({ facility, audiences: { broadcast: true }, message: `silent ${n}` });
        }
        await received(page, 'silent 5');
        const seen = await page.evaluate(() => ({
          events: rec.events,
          messages: rec.messages,
          sockets: __tSockets.map((s) => s.protocol),
        }));
        ctx.notes.push(`events: ${JSON.stringify(seen.events)}`);
        assert(
          JSON.stringify(seen.sockets) === '["wsrelay.v1"]',
          `one WebSocket, opened with the envelope offered: ${JSON.stringify(seen.sockets)}`,
        );
        assert(
          seen.events.includes('disconnected:1006:nothing received'),
          `the silent socket should have been dropped: ${JSON.stringify(seen.events)}`,
        );
        assert(
          JSON.stringify(seen.messages) === JSON.stringify(['silent 1', 'silent 2', 'silent 3', 'silent 4', 'silent 5']),
          `messages: ${JSON.stringify(seen.messages)}`,
        );
      } catch (e) {
        noteFailure(ctx, [gw]);
        throw e;
      } finally {
        if (proxy) {
          await proxy.stop();
        }
        await setup.stop();
      }
    },
  },
];

// ---------------------------------------------------------------------------------------

async function runScenario(scenario, env) {
  const ctx = { contexts: [], notes: [], pages: 0 };
  const label = `${scenario.id}. ${scenario.name}`;
  let timer;
  const limit = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`scenario took longer than ${SCENARIO_LIMIT / 1000} s`)), SCENARIO_LIMIT);
  });
  const began = Date.now();
  let error = null;
  try {
    await Promise.race([scenario.run(env, ctx), limit]);
  } catch (e) {
    error = e;
  } finally {
    clearTimeout(timer);
    for (const context of ctx.contexts) {
      await context.close().catch(() => {});
    }
  }
  // A scenario that stopped the gateway and failed before starting it again must not
  // take the next ones down with it.
  for (const gw of [env.gw, env.demo]) {
    if (gw.child === null) {
      await gw.start().catch((e) => log(`  could not restart ${gw.name}: ${e.message}`));
    }
  }
  const secs = ((Date.now() - began) / 1000).toFixed(1);
  if (error === null) {
    log(`ok    ${label} (${secs} s)`);
    for (const note of ctx.notes.filter((n) => process.env.WSRELAY_NOTES || n.startsWith('screenshot'))) {
      log(`      ${note}`);
    }
    return true;
  }
  log(`FAIL  ${label} (${secs} s)`);
  log(`      ${error.stack || error}`.split('\n').join('\n      '));
  for (const note of ctx.notes) {
    log(`      ${note}`);
  }
  for (const gw of [env.gw, env.demo]) {
    log(`      --- ${gw.name} log (last lines) ---`);
    for (const line of gw.tail()) {
      log(`      ${line}`);
    }
  }
  return false;
}

async function main() {
  if (!BIN) {
    throw new Error('set WSRELAY_BIN to the wsrelay binary (cargo build; target/debug/wsrelay)');
  }
  if (!fs.existsSync(BIN)) {
    throw new Error(`WSRELAY_BIN=${BIN} does not exist`);
  }
  if (!fs.existsSync(CHROMIUM)) {
    throw new Error(`${CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium)`);
  }
  const { chromium } = await import('playwright-core');
  const wanted = process.argv.slice(2);
  const selected = scenarios.filter((s) => wanted.length === 0 || wanted.includes(s.id));
  assert(selected.length > 0, `no scenario matches ${wanted.join(' ')}`);

  const redis = await Redis.start();
  const gw = await Gateway.create('gateway', {
    WSRELAY__REDIS__URL: redis.url,
    WSRELAY__REDIS__RECONNECT_MAX: '0.5',
    WSRELAY__HEARTBEAT: HEARTBEAT,
    WSRELAY__HEARTBEAT_INTERVAL: '0.5',
    WSRELAY__PUBLISH_TOKEN: TOKEN,
    WSRELAY__POLICY__COMPAT: 'true',
  });
  // The out-of-the-box gateway: embedded broker, demo page on, default policy.
  const demo = await Gateway.create('demo gateway', {});
  await Promise.all([gw.start(), demo.start()]);

  const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'wsrelay-chromium-'));
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    timeout: WAIT * 2,
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
    env: { ...process.env, HOME: profile },
  });
  log(`chromium ${browser.version()}, gateway ${gw.origin} (redis ${redis.port}), demo ${demo.origin}`);

  let passed = 0;
  let failed = 0;
  try {
    for (const scenario of selected) {
      if (await runScenario(scenario, { browser, redis, gw, demo })) {
        passed += 1;
      } else {
        failed += 1;
      }
    }
  } finally {
    await browser.close().catch(() => {});
    await Promise.all([gw.stop(), demo.stop(), redis.stop()]);
    fs.rmSync(profile, { recursive: true, force: true });
  }
  return { passed, failed };
}

const guard = setTimeout(() => {
  log(`the run took longer than ${RUN_LIMIT / 1000} s`);
  log('0 passed, 1 failed');
  killAll();
  process.exit(1);
}, RUN_LIMIT);

main().then(
  ({ passed, failed }) => {
    clearTimeout(guard);
    log(`${passed} passed, ${failed} failed`);
    process.exitCode = failed === 0 ? 0 : 1;
  },
  (e) => {
    clearTimeout(guard);
    log(`could not run the browser tests: ${e.stack || e}`);
    log('0 passed, 1 failed');
    killAll();
    process.exitCode = 1;
  },
);
