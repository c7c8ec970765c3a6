//! What a socket gets when it starts: its subscriptions confirmed, then, per key, the
//! stored message or what it missed since the id it resumes from (the broker's
//! [`CatchUp`]), turned into frames that go out ahead of anything live.

use std::sync::Arc;

use bytes::Bytes;

use super::Setup;
use crate::history::{self, envelope, CatchUp, StreamId};
use crate::outbox;
use crate::registry::Form;
use crate::socket::Floors;
use crate::worker::{Relay, Worker};

/// Registers the subscriptions' confirmation and then reads what each key gives a
/// starting socket: its stored message, or what it missed since `last-id`.
pub(crate) fn setup(worker: &Worker, params: &super::SocketParams) -> Setup {
    let relay = worker.relay.clone();
    let keys = params.subscribe.clone();
    let resume = params.resume.clone();
    Box::pin(async move {
        if keys.is_empty() {
            return Some(Vec::new());
        }
        if !relay.registry.barrier().await {
            return None;
        }
        // Boxed only now: the future waits on the barrier small (thousands of sockets
        // may be waiting at once) and takes the read's space once it reads.
        let budget = relay.config.queue_bytes;
        let read = Box::pin(relay.broker.catch_up(&keys, &resume, budget));
        read.await.ok()
    })
}

/// Pairs each of `keys` with what setup read for it (nothing when setup gave up),
/// tells the registry where the socket starts on each key, and returns the pairs and
/// the socket's floors: per key, the newest id the client has after setup (a live
/// publication up to it is a duplicate).
pub(crate) fn started(
    relay: &Relay,
    keys: &[Arc<str>],
    caught: Option<Vec<CatchUp>>,
) -> (Vec<(Arc<str>, CatchUp)>, Floors) {
    let caught: Vec<(Arc<str>, CatchUp)> = keys
        .iter()
        .cloned()
        .zip(caught.unwrap_or_default())
        .collect();
    let mut floors = Vec::new();
    for (i, (key, caught)) in caught.iter().enumerate() {
        let stored = match caught {
            CatchUp::Stored {
                stored: Some((payload, _)),
                ..
            } => Some(&payload[..]),
            _ => None,
        };
        // A history key whose stream does not exist yet starts from its beginning.
        let newest = relay
            .broker
            .retention()
            .of(key)
            .map(|_| caught.newest().unwrap_or(StreamId::ZERO));
        relay.registry.seen(key, newest, stored);
        if let Some(id) = caught.floor() {
            floors.push((outbox::key_index(i), id));
        }
    }
    (caught, floors)
}

/// The frames a socket gets when its setup ends, key after key, and what they cost.
pub(crate) struct CatchUpFrames<'r> {
    relay: &'r Relay,
    form: Form,
    /// Each resumed key gets a reset and its newest message instead of its replay.
    no_replay: bool,
    pub(crate) frames: Vec<Bytes>,
    /// Each frame's payload bytes (0 for control messages), for the metrics.
    pub(crate) sizes: Vec<usize>,
    /// Whether each frame is a control message of the envelope.
    controls: Vec<bool>,
    pub(crate) replayed: usize,
    pub(crate) resets: usize,
    /// Messages dropped so that the rest fits under `queue_bytes`.
    pub(crate) trimmed: usize,
}

impl<'r> CatchUpFrames<'r> {
    fn new(relay: &'r Relay, form: Form, no_replay: bool) -> Self {
        CatchUpFrames {
            relay,
            form,
            no_replay,
            frames: Vec::new(),
            sizes: Vec::new(),
            controls: Vec::new(),
            replayed: 0,
            resets: 0,
            trimmed: 0,
        }
    }

    /// Everything a starting socket gets, under `queue_bytes`: a replay that does not
    /// fit is not cut short silently (each resumed key gets a reset and its newest
    /// message instead), and what still does not fit loses messages, never the control
    /// messages that say what is missing.
    pub(crate) fn build(
        relay: &'r Relay,
        form: Form,
        caught: &[(Arc<str>, CatchUp)],
        confirmed: bool,
    ) -> Self {
        let mut frames = CatchUpFrames::new(relay, form, false);
        frames.add(caught, confirmed);
        if frames.fitting() < frames.len() && frames.replayed > 0 {
            frames = CatchUpFrames::new(relay, form, true);
            frames.add(caught, confirmed);
        }
        frames.trimmed = frames.trim_to_fit();
        frames
    }

    fn len(&self) -> usize {
        self.frames.len()
    }

    /// How many frames, in order, fit under `queue_bytes` on their own.
    fn fitting(&self) -> usize {
        outbox::fitting(&self.frames, self.relay.config.queue_bytes)
    }

    /// Drops messages, last first, until every frame fits: the control messages (what
    /// tells the client that something is missing) always go out. Returns how many
    /// messages were dropped.
    fn trim_to_fit(&mut self) -> usize {
        let mut dropped = 0;
        while self.fitting() < self.frames.len() {
            let Some(i) = self.controls.iter().rposition(|&control| !control) else {
                break;
            };
            self.frames.remove(i);
            self.sizes.remove(i);
            self.controls.remove(i);
            dropped += 1;
        }
        dropped
    }

    /// The frames of every key's catch-up; first, when the subscriptions were
    /// `confirmed`, the envelope's `subscribed` (it always fits: the first frame does).
    fn add(&mut self, caught: &[(Arc<str>, CatchUp)], confirmed: bool) {
        // A long-poll answer is over before anything live: `subscribed` would say nothing.
        if confirmed && self.form.has_controls() && self.form != Form::Poll {
            let retention = self.relay.broker.retention();
            let labels: Vec<String> = caught.iter().map(|(k, _)| retention.label(k)).collect();
            self.control(envelope::subscribed(&labels));
        }
        for (key, caught) in caught {
            let label = match self.form {
                Form::Plain => String::new(),
                _ => self.relay.broker.retention().label(key),
            };
            match caught {
                CatchUp::Stored { stored, .. } => {
                    if let Some((payload, id)) = stored {
                        self.message(&label, payload, *id, true);
                    }
                }
                CatchUp::Resumed { entries, .. } if self.no_replay && !entries.is_empty() => {
                    self.resets += 1;
                    self.control(envelope::reset(&label, history::TOO_MUCH));
                    // unwrap: not empty.
                    let (id, payload) = entries.last().unwrap();
                    self.message(&label, payload, Some(*id), true);
                }
                CatchUp::Resumed { entries, .. } => {
                    for (id, payload) in entries {
                        self.message(&label, payload, Some(*id), false);
                    }
                    self.replayed += entries.len();
                    // A long-poll's ids say it all; an answer of only `resumed` would
                    // end a poll that has nothing to wait out.
                    if self.form != Form::Poll {
                        self.control(envelope::resumed(&label, entries.len()));
                    }
                }
                CatchUp::Reset { reason, stored, .. } => {
                    self.resets += 1;
                    self.control(envelope::reset(&label, reason));
                    if let Some((payload, id)) = stored {
                        self.message(&label, payload, *id, true);
                    }
                }
            }
        }
    }

    /// A stored or replayed message; the heartbeat string and payloads over
    /// `max_publication_size` are never relayed.
    fn message(&mut self, label: &str, payload: &Bytes, id: Option<StreamId>, stored: bool) {
        let config = &self.relay.config;
        let heartbeat = config.heartbeat.as_ref().map(|h| &h.text[..]);
        if Some(&payload[..]) == heartbeat || payload.len() > config.max_publication_size {
            return;
        }
        self.frames
            .push(self.form.message(label, id, payload, stored));
        self.sizes.push(payload.len());
        self.controls.push(false);
    }

    /// A control message: not for plain sockets.
    fn control(&mut self, text: String) {
        let Some(frame) = self.form.control(&text) else {
            return;
        };
        self.frames.push(frame);
        self.sizes.push(0);
        self.controls.push(true);
    }
}
