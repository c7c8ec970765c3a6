//! Long-polling: `GET /poll/<facility>?subscribe-…&since=…` answers a JSON array of the
//! messages newer than `since`, at once when there are some, else as soon as one is
//! published, else `[]` after `poll_timeout`.
//!
//! A long-poll is a socket that answers once: it leaves the HTTP dispatcher at its head
//! ([`crate::server`]), joins the worker's fan-out like any socket, and goes through the
//! same setup (subscriptions confirmed, then what the client missed read from the
//! broker), so any gateway process can answer any poll: the client's position travels
//! in `since`, the messages are in Redis. What it gets is the envelope's JSON
//! ([`crate::history::envelope`]); every message carries an id, which on keys without
//! history names the stored message (`~` and a fingerprint), so a client that passes
//! its ids back never gets the same stored message twice.

use std::future::poll_fn;
use std::rc::Rc;
use std::task::Poll;

use bytes::{BufMut, Bytes, BytesMut};
use log::debug;

use crate::conn::catch_up::{setup, started, CatchUpFrames};
use crate::conn::SocketParams;
use crate::handshake::Accepted;
use crate::history::{CatchUp, StreamId};
use crate::registry::{fingerprint, Form};
use crate::socket::{signal, Socket};
use crate::wheel::Tick;
use crate::worker::Worker;
use crate::ws::Stream;

/// The id a long-poll client gets for a message: its stream id on a key with history;
/// on a key without, `~` and a fingerprint of the payload, which names the stored
/// message well enough for the client to say it has seen it.
pub fn message_id(id: Option<StreamId>, payload: &[u8]) -> String {
    match id {
        Some(id) => id.to_string(),
        None => format!("~{:016x}", fingerprint(payload).1),
    }
}

/// The answer's head lines before its length: the connection closes after the answer.
/// `origin`: the request's `Origin` when the policy allowed it (CORS with credentials).
pub fn response_lines(origin: Option<&str>) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncache-control: no-store\r\n\
         connection: close\r\n{}",
        crate::event_stream::cors_headers(origin)
    )
    .into_bytes()
}

/// Serves one long-poll on this worker.
pub fn spawn(worker: &Rc<Worker>, stream: Stream, accepted: Accepted) {
    let task = serve(worker.clone(), stream, accepted);
    tokio::task::spawn_local(worker.relay.tracker.track_future(task));
}

/// Counts the poll in `wsrelay_polls` while it lives.
struct Counted(prometheus::IntGauge);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Removes the poll's socket from the fan-out however the task ends.
struct Attached<'a> {
    worker: &'a Worker,
    socket: Rc<Socket>,
    params: &'a SocketParams,
}

impl Drop for Attached<'_> {
    fn drop(&mut self) {
        self.worker.detach(&self.socket, &self.params.subscribe);
    }
}

async fn serve(worker: Rc<Worker>, stream: Stream, accepted: Accepted) {
    let Accepted {
        response,
        params,
        seen,
    } = accepted;
    let relay = worker.relay.clone();
    relay.metrics.polls.inc();
    let _counted = Counted(relay.metrics.polls.clone());
    let now = worker.clock.now();
    let socket = Rc::new(Socket::new(stream, false, Form::Poll, None, now));
    worker.attach(&socket, &params.subscribe);
    let attached = Attached {
        worker: &worker,
        socket: socket.clone(),
        params: &params,
    };
    let deadline = now + relay.config.poll_timeout;
    let caught = match wait_setup(&worker, &socket, &params, now + relay.config.setup_timeout).await
    {
        Some(caught) => caught,
        None => return,
    };
    let mut caught = caught;
    let sent = caught
        .as_mut()
        .map_or_else(Vec::new, |c| stored_to_send(c, &seen));
    // Per key, the message the client will have once answered: the stored one this
    // answer carries, else the one `since` named. A live copy of it (published while
    // the poll started, or still on its way to this worker) is not sent again.
    let known: Vec<Option<u64>> = sent
        .iter()
        .enumerate()
        .map(|(i, sent)| sent.or(seen.get(i).copied().flatten()))
        .collect();
    let (caught, floors) = started(&relay, &params.subscribe, caught);
    let confirmed = caught.len() == params.subscribe.len();
    let catch_up = CatchUpFrames::build(&relay, Form::Poll, &caught, confirmed);
    let mut elements: Vec<Bytes> = catch_up.frames;
    // On a key without history only the newest message counts, and a stored one just
    // read is it: what arrived live meanwhile is older, or the same.
    let mut held = socket.take_held(Some(floors), |key, named| {
        let sending = sent.get(usize::from(key)).is_some_and(Option::is_some);
        named.is_none() || (!sending && is_news(&known, key, named))
    });
    // Until something the client does not have arrives, the deadline, or the drain.
    while elements.is_empty() && held.is_empty() && !relay.shutdown.is_cancelled() {
        worker.schedule(&socket, deadline);
        match wait_for_messages(&worker, &socket, deadline).await {
            Waited::Arrived => {
                held = socket.take_held(None, |key, named| is_news(&known, key, named))
            }
            Waited::Over => break,
            Waited::Gone => return,
        }
    }
    elements.extend(held.into_iter().map(|f| (*f).clone()));
    drop(attached);
    relay.metrics.frames_delivered.inc_by(elements.len() as u64);
    answer(&worker, &socket, response, &elements).await;
    debug!("poll {} answered {} messages", params.id, elements.len());
}

/// Runs the socket's setup; `None` when the client left meanwhile. The inner `None`:
/// setup gave up (Redis did not confirm in time), the poll goes on without the
/// stored messages.
async fn wait_setup(
    worker: &Worker,
    socket: &Rc<Socket>,
    params: &SocketParams,
    deadline: Tick,
) -> Option<Option<Vec<CatchUp>>> {
    let mut reading = setup(worker, params);
    worker.schedule(socket, deadline);
    poll_fn(|cx| {
        if let Poll::Ready(caught) = reading.as_mut().poll(cx) {
            return Poll::Ready(Some(caught));
        }
        let bits = socket.take_signals(cx.waker());
        if bits & signal::BROKEN != 0 || client_gone(socket, cx) {
            return Poll::Ready(None);
        }
        if deadline_came(worker, socket, bits, deadline) {
            return Poll::Ready(Some(None));
        }
        Poll::Pending
    })
    .await
}

/// Whether `deadline` has come, given the signals just taken. The wheel only ever moves
/// a socket's entry earlier, so when an earlier entry (setup's) fired instead, this
/// deadline is asked for again.
fn deadline_came(worker: &Worker, socket: &Rc<Socket>, bits: u8, deadline: Tick) -> bool {
    if bits & signal::TIMER == 0 {
        return false;
    }
    if worker.clock.now() >= deadline {
        return true;
    }
    worker.schedule(socket, deadline);
    false
}

/// How waiting for a long-poll's messages ended.
enum Waited {
    /// A publication is held (it may still be one the client has).
    Arrived,
    /// The deadline came, the drain began, or the socket fell behind: answer now.
    Over,
    /// The client left.
    Gone,
}

async fn wait_for_messages(worker: &Worker, socket: &Rc<Socket>, deadline: Tick) -> Waited {
    poll_fn(|cx| {
        let bits = socket.take_signals(cx.waker());
        if bits & signal::BROKEN != 0 || client_gone(socket, cx) {
            return Poll::Ready(Waited::Gone);
        }
        if bits & (signal::OVERFLOW | signal::DRAIN) != 0 {
            return Poll::Ready(Waited::Over);
        }
        if bits & signal::ARRIVED != 0 {
            return Poll::Ready(Waited::Arrived);
        }
        if deadline_came(worker, socket, bits, deadline) {
            return Poll::Ready(Waited::Over);
        }
        Poll::Pending
    })
    .await
}

/// Whether the client closed its side or the connection broke; what it sends is
/// dropped (it has nothing to say). Registers for the next readiness otherwise.
fn client_gone(socket: &Socket, cx: &mut std::task::Context<'_>) -> bool {
    let mut sink = [0u8; 512];
    for _ in 0..16 {
        if socket.stream.poll_read_ready(cx).is_pending() {
            return false;
        }
        match socket.stream.try_read(&mut sink) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return true,
        }
    }
    // A client that keeps sending gets its turn again later.
    cx.waker().wake_by_ref();
    false
}

/// On keys without history: drops the stored message the client has already seen
/// (`since=<label>:~<hex>` names it), and returns per key the fingerprint of the stored
/// message this answer carries (`None`: none, or a key with history).
fn stored_to_send(caught: &mut [CatchUp], seen: &[Option<u64>]) -> Vec<Option<u64>> {
    caught
        .iter_mut()
        .enumerate()
        .map(|(i, caught)| {
            let CatchUp::Stored { stored, .. } = caught else {
                return None;
            };
            let Some((payload, None)) = stored else {
                return None;
            };
            let named = fingerprint(payload).1;
            if Some(named) == seen.get(i).copied().flatten() {
                *stored = None;
                return None;
            }
            Some(named)
        })
        .collect()
}

/// Whether a publication of subscribe key `key` without history, named `named`, is not
/// the message the client has or is about to get (`known`).
fn is_news(known: &[Option<u64>], key: crate::outbox::KeyIndex, named: Option<u64>) -> bool {
    named.is_none() || named != known.get(usize::from(key)).copied().flatten()
}

/// Writes the answer (`[` elements `]`) and closes the connection.
async fn answer(worker: &Worker, socket: &Rc<Socket>, head: Vec<u8>, elements: &[Bytes]) {
    let body_len = 2 + elements
        .iter()
        .map(|e| e.len() + 1)
        .sum::<usize>()
        .saturating_sub(1);
    let mut out = BytesMut::with_capacity(head.len() + 32 + body_len);
    out.put_slice(&head);
    out.put_slice(format!("content-length: {body_len}\r\n\r\n[").as_bytes());
    for (i, element) in elements.iter().enumerate() {
        if i > 0 {
            out.put_u8(b',');
        }
        out.put_slice(element);
    }
    out.put_u8(b']');
    let now = worker.clock.now();
    socket.start_closing(false);
    socket.send_close(out.freeze(), now);
    let deadline = now + worker.relay.config.close_timeout;
    finish(worker, socket, deadline).await;
}

/// Waits until the answer is written, shuts the write side, and waits for the client
/// to close (at most until `deadline`; a client that has not is then reset, so that it
/// cannot keep the descriptor).
async fn finish(worker: &Worker, socket: &Rc<Socket>, deadline: Tick) {
    worker.schedule(socket, deadline);
    let mut shut = false;
    let closed = poll_fn(|cx| loop {
        let bits = socket.take_signals(cx.waker());
        if bits & signal::BROKEN != 0 {
            return Poll::Ready(true);
        }
        if deadline_came(worker, socket, bits, deadline) {
            return Poll::Ready(false);
        }
        if socket.wants_write() {
            match socket.stream.poll_write_ready(cx) {
                Poll::Ready(Ok(())) => {
                    socket.writable(worker.clock.now());
                    continue;
                }
                Poll::Ready(Err(_)) => return Poll::Ready(true),
                Poll::Pending => return Poll::Pending,
            }
        }
        if !shut && !socket.has_unwritten() {
            socket.stream.shutdown_write();
            shut = true;
        }
        if shut && client_gone(socket, cx) {
            return Poll::Ready(true);
        }
        return Poll::Pending;
    })
    .await;
    if !closed {
        socket.stream.discard_unsent_on_close();
    }
}
