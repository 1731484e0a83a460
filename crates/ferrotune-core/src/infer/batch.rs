//! Continuous batching: one thread owns the model and runs every admitted sequence together. Each iteration
//! feeds the waiting prompts a bounded number of tokens (whole chunks, so each prompt is cut at the same places
//! whatever else runs), then decodes one token of every running sequence as one batch: the weights are read once
//! for all of them. Sequences join between iterations and leave as soon as they finish or their consumer goes away.
//!
//! A row of a batch gets the numbers it would get alone (the decoding products sum each output in one order for
//! any number of rows, and the recurrent and attention parts run per sequence), so a greedy answer does not depend
//! on what else the server is doing.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;

use anyhow::{anyhow, Result};

use super::engine::{
    Decoding, Engine, FinishReason, GenerateRequest, Generation, NamedAdapter, Prefill, Prompt, PREFILL_CHUNK,
};
use crate::models::qwen3_5::Cache;
use crate::nn::stream::STREAM_ROWS;
use crate::nn::{with_row_adapters, RowAdapter};

/// Where a request's results go. Every method is called on the batching thread, so each must be quick.
pub trait Sink: Send {
    /// The consumer went away: the request is dropped (checked while it waits and between tokens).
    fn gone(&self) -> bool;
    /// The request leaves the queue: its prompt starts going through the model.
    fn started(&mut self);
    /// A piece of text, as [`Engine::generate`] hands it out; false cancels the request.
    fn text(&mut self, piece: &str) -> bool;
    /// How the request ended: called exactly once, without [`Sink::started`] when it left while queued (then
    /// with no tokens and [`FinishReason::Cancelled`]).
    fn done(self: Box<Self>, outcome: Result<Generation>);
}

/// A request for the batching thread.
pub struct Job {
    pub prompt: Prompt,
    pub req: GenerateRequest,
    /// One of the adapters served by name (None: the base as loaded).
    pub adapter: Option<Arc<NamedAdapter>>,
    pub sink: Box<dyn Sink>,
}

#[derive(Clone, Copy, Debug)]
pub struct BatchOptions {
    /// Sequences decoding at once; more requests wait in the queue.
    pub max_seqs: usize,
    /// Prompt tokens fed per iteration (at least one chunk of one prompt): the pause a new prompt imposes on the
    /// running sequences.
    pub prefill_chunk: usize,
}

impl Default for BatchOptions {
    fn default() -> Self {
        Self { max_seqs: 16, prefill_chunk: PREFILL_CHUNK }
    }
}

/// What the batching thread has done, for metrics.
#[derive(Debug, Default)]
pub struct BatchStats {
    /// Decoding steps (each one batch of rows).
    pub steps: AtomicU64,
    /// Rows decoded, all steps together (rows / steps: the mean batch size).
    pub rows: AtomicU64,
    /// The largest batch decoded so far.
    pub max_rows: AtomicUsize,
    /// Prompt tokens fed.
    pub prefill_tokens: AtomicU64,
    /// Time spent feeding prompts (vision tower included) and decoding, in microseconds.
    pub prefill_micros: AtomicU64,
    pub decode_micros: AtomicU64,
}

/// The handle of the batching thread; the thread ends once every handle is dropped and its work is done.
pub struct Batcher {
    tx: mpsc::Sender<Job>,
    pub stats: Arc<BatchStats>,
}

impl Batcher {
    pub fn start(engine: Arc<Engine>, opts: BatchOptions) -> Self {
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(BatchStats::default());
        let st = stats.clone();
        let spawned =
            std::thread::Builder::new().name("ferrotune-batch".into()).spawn(move || run(&engine, opts, rx, &st));
        if let Err(e) = spawned {
            // Without a thread the receiver is gone, and every submit answers with this error.
            eprintln!("cannot start the batching thread: {e}");
        }
        Self { tx, stats }
    }

    /// Queues a request (first come, first served).
    pub fn submit(&self, job: Job) {
        if let Err(mpsc::SendError(job)) = self.tx.send(job) {
            job.sink.done(Err(anyhow!("the generation thread has stopped; see the server log")));
        }
    }
}

enum Stage {
    /// Admitted; the vision tower and embeddings not yet run.
    Admitted(Prompt),
    Prefilling(Prefill),
    /// The next token to feed.
    Decoding(u32),
}

struct Seq {
    sink: Box<dyn Sink>,
    adapter: Option<Arc<NamedAdapter>>,
    stage: Stage,
    cache: Cache,
    dec: Decoding,
    rope_delta: i64,
    /// Set once the sequence is over: Ok for a finished generation, Err for a failure.
    ended: Option<Result<()>>,
}

impl Seq {
    /// Takes the logits of the sequence's last position: picks its next token, or ends it.
    fn advance(&mut self, engine: &Engine, logits: &mut [f32]) {
        let sink = &mut self.sink;
        let dec = &mut self.dec;
        match guard(|| dec.accept(&engine.tokenizer, logits, &mut |p| sink.text(p))) {
            Ok(Some(tok)) => self.stage = Stage::Decoding(tok),
            Ok(None) => self.ended = Some(Ok(())),
            Err(e) => self.ended = Some(Err(e)),
        }
    }

    fn end(self) {
        let Seq { mut sink, dec, ended, .. } = self;
        match ended {
            Some(Err(e)) => sink.done(Err(e)),
            _ => {
                let g = dec.finish(&mut |p| sink.text(p));
                sink.done(Ok(g));
            }
        }
    }
}

/// Runs `f`, turning a panic into an error so that one request cannot take the thread down.
fn guard<R>(f: impl FnOnce() -> Result<R>) -> Result<R> {
    std::panic::catch_unwind(AssertUnwindSafe(f))
        .unwrap_or_else(|_| Err(anyhow!("internal error: generation panicked; see the server log")))
}

fn run(engine: &Engine, opts: BatchOptions, mut rx: mpsc::Receiver<Job>, stats: &BatchStats) {
    let mut queue: VecDeque<Job> = VecDeque::new();
    let mut seqs: Vec<Seq> = Vec::new();
    loop {
        match rx.recv() {
            Ok(job) => queue.push_back(job),
            Err(_) => return,
        }
        // While there is work, the loop runs on a worker of the compute pool: each op's parallel work then starts
        // from a worker instead of being handed to the pool and waited for across threads (decoding 9-13%
        // faster). Waiting for requests happens outside it, so that an idle loop holds no worker. Not with a
        // one-thread pool (a small model): the request threads' image work would wait for the loop to drain.
        let busy = || {
            while !(seqs.is_empty() && queue.is_empty()) {
                iterate(engine, &opts, &rx, stats, &mut queue, &mut seqs);
            }
            rx
        };
        rx = if rayon::current_num_threads() > 1 { crate::parallel::on_compute_pool(busy) } else { busy() };
    }
}

/// One iteration: new requests admitted, waiting prompts fed a chunk, one token of every decoding sequence.
fn iterate(
    engine: &Engine,
    opts: &BatchOptions,
    rx: &mpsc::Receiver<Job>,
    stats: &BatchStats,
    queue: &mut VecDeque<Job>,
    seqs: &mut Vec<Seq>,
) {
    let max_seqs = opts.max_seqs.max(1);
    queue.extend(rx.try_iter());
    // Requests whose client left while queued end here, never started.
    let (left, kept): (Vec<Job>, Vec<Job>) = queue.drain(..).partition(|j| j.sink.gone());
    *queue = kept.into();
    for job in left {
        let g = Generation {
            text: String::new(),
            token_ids: vec![],
            prompt_tokens: job.prompt.ids.len(),
            finish_reason: FinishReason::Cancelled,
        };
        job.sink.done(Ok(g));
    }
    while seqs.len() < max_seqs {
        let Some(Job { prompt, req, adapter, mut sink }) = queue.pop_front() else { break };
        sink.started();
        let dec = Decoding::new(engine, &prompt.ids, &req);
        let cache = Cache::new(engine.model.layers.len());
        seqs.push(Seq { sink, adapter, stage: Stage::Admitted(prompt), cache, dec, rope_delta: 0, ended: None });
    }
    let t = std::time::Instant::now();
    let fed = prefill(engine, seqs, opts.prefill_chunk.max(1));
    stats.prefill_tokens.fetch_add(fed as u64, Ordering::Relaxed);
    let t2 = std::time::Instant::now();
    stats.prefill_micros.fetch_add((t2 - t).as_micros() as u64, Ordering::Relaxed);
    decode(engine, seqs, stats);
    stats.decode_micros.fetch_add(t2.elapsed().as_micros() as u64, Ordering::Relaxed);
    for s in seqs.iter_mut().filter(|s| s.ended.is_none() && s.sink.gone()) {
        s.dec.cancel();
        s.ended = Some(Ok(()));
    }
    let (over, running): (Vec<Seq>, Vec<Seq>) = seqs.drain(..).partition(|s| s.ended.is_some());
    *seqs = running;
    over.into_iter().for_each(Seq::end);
}

/// Feeds waiting prompts, oldest first, whole chunks until `budget` tokens are spent (at least one chunk);
/// returns the tokens fed.
fn prefill(engine: &Engine, seqs: &mut [Seq], budget: usize) -> usize {
    let mut spent = 0;
    for s in seqs.iter_mut().filter(|s| s.ended.is_none()) {
        let len = match &s.stage {
            Stage::Admitted(prompt) => prompt.ids.len().min(budget),
            Stage::Prefilling(p) => p.next_chunk(budget),
            Stage::Decoding(_) => continue,
        };
        if spent > 0 && spent + len > budget {
            break;
        }
        spent += len;
        // The sequence's adapter for every row of its prompt (the vision tower's too).
        let chosen = s.adapter.as_ref().map(|a| vec![a.rows(None)]).unwrap_or_default();
        if let Stage::Admitted(prompt) = &s.stage {
            match guard(|| with_row_adapters(chosen.clone(), || engine.begin_prefill(prompt))) {
                Ok(p) => {
                    s.rope_delta = p.pos.delta;
                    s.stage = Stage::Prefilling(p);
                }
                Err(e) => {
                    s.ended = Some(Err(e));
                    continue;
                }
            }
        }
        let Stage::Prefilling(p) = &mut s.stage else { continue };
        match guard(|| with_row_adapters(chosen, || engine.prefill_chunk(p, &mut s.cache, budget))) {
            Ok(None) => {}
            Ok(Some(mut logits)) => s.advance(engine, &mut logits),
            Err(e) => s.ended = Some(Err(e)),
        }
        if spent >= budget {
            break;
        }
    }
    spent
}

/// One token of every decoding sequence, [`STREAM_ROWS`] rows a batch at most.
fn decode(engine: &Engine, seqs: &mut [Seq], stats: &BatchStats) {
    let mut rows: Vec<(u32, &mut Seq)> = seqs
        .iter_mut()
        .filter_map(|s| match s.stage {
            Stage::Decoding(t) if s.ended.is_none() => Some((t, s)),
            _ => None,
        })
        .collect();
    for group in rows.chunks_mut(STREAM_ROWS) {
        let tokens: Vec<u32> = group.iter().map(|(t, _)| *t).collect();
        stats.steps.fetch_add(1, Ordering::Relaxed);
        stats.rows.fetch_add(tokens.len() as u64, Ordering::Relaxed);
        stats.max_rows.fetch_max(tokens.len(), Ordering::Relaxed);
        let deltas: Vec<i64> = group.iter().map(|(_, s)| s.rope_delta).collect();
        let chosen = adapter_rows(group.iter().map(|(_, s)| s.adapter.as_ref()));
        let out = {
            let mut caches: Vec<&mut Cache> = group.iter_mut().map(|(_, s)| &mut s.cache).collect();
            guard(|| with_row_adapters(chosen, || engine.step_rows(&tokens, &deltas, &mut caches)))
        };
        match out {
            Ok(logits) => {
                for ((_, s), mut l) in group.iter_mut().zip(logits) {
                    s.advance(engine, &mut l);
                }
            }
            Err(e) => {
                let msg = format!("{e:#}");
                for (_, s) in group.iter_mut() {
                    s.ended = Some(Err(anyhow!("{msg}")));
                }
            }
        }
    }
}

/// The rows of a decoding batch grouped by their sequences' adapters (rows of the base in none).
fn adapter_rows<'a>(adapters: impl Iterator<Item = Option<&'a Arc<NamedAdapter>>>) -> Vec<RowAdapter> {
    let mut groups: Vec<(&Arc<NamedAdapter>, Vec<usize>)> = Vec::new();
    for (row, a) in adapters.enumerate() {
        let Some(a) = a else { continue };
        match groups.iter_mut().find(|(g, _)| Arc::ptr_eq(g, a)) {
            Some((_, rows)) => rows.push(row),
            None => groups.push((a, vec![row])),
        }
    }
    groups.into_iter().map(|(a, rows)| a.rows(Some(rows))).collect()
}
