//! Steps queued ahead: a follow-up step, fed on the device with the tokens
//! the step before it sampled, gives what stepping one at a time with the
//! tokens fed from the host gives; and the engine, queueing steps ahead,
//! sends every request what it sends without.

use std::time::{Duration, Instant};

use mamba_serve::engine::{EngineHandle, EngineOptions, Event, FinishReason, Request, offline};
use mamba_serve::metrics::Metrics;
use mamba_serve::model::{Runner, SeqChunk};
use mamba_serve::sampling::{SampleRow, SampledToken, SamplingParams};

use crate::common::*;

/// Sampled tokens by sequence.
pub type Tokens = Vec<Vec<SampledToken>>;
/// One request's events.
type Events = Vec<Event>;

/// Each sequence's sampling row: greedy, drawn with several processors,
/// greedy with alternatives, drawn with a logit bias.
pub fn mixed_row(seq: usize, step: u64, vocab: usize) -> SampleRow {
    let g = SampleRow { step, ..SampleRow::greedy(vocab) };
    match seq % 4 {
        0 => g,
        1 => SampleRow { temperature: 0.8, top_k: 20, seed: 7 + seq as u64, ..g },
        2 => SampleRow { top_logprobs: 3, ..g },
        _ => SampleRow { temperature: 1.0, top_p: 0.9, min_p: 0.05, seed: 9, logit_bias: vec![(5, 2.0), (11, -1.5)], ..g },
    }
}

/// Generates `steps` tokens after each of `prompts` twice: in slots
/// `0..n` with every decode step a follow-up queued before the last
/// step's tokens are read, and in slots `n..2n` one step at a time, the
/// tokens fed back from the host. Returns both, by sequence.
/// `row(seq, step, vocab)` is each token's sampling row.
pub fn ahead_and_stepped(
    m: &mut dyn Runner,
    prompts: &[Vec<u32>],
    steps: usize,
    row: &dyn Fn(usize, u64, usize) -> SampleRow,
) -> Result<(Tokens, Tokens), Box<dyn std::error::Error>> {
    let n = prompts.len();
    let vocab = m.config().vocab_size;
    let rows = |step: u64| -> Vec<SampleRow> { (0..n).map(|i| row(i, step, vocab)).collect() };
    let some = |r: Vec<SampleRow>| -> Vec<Option<SampleRow>> { r.into_iter().map(Some).collect() };
    let take = |got: Vec<Option<SampledToken>>, into: &mut Vec<Vec<SampledToken>>| {
        for (i, t) in got.into_iter().enumerate() {
            into[i].push(t.expect("every chunk samples"));
        }
    };
    for slot in 0..2 * n {
        m.reset_slot(slot)?;
    }
    let mut ahead = vec![vec![]; n];
    let prefill = |base: usize| -> Vec<SeqChunk<'_>> {
        prompts.iter().enumerate().map(|(i, p)| SeqChunk { slot: base + i, tokens: p, is_prompt: true }).collect()
    };
    m.launch(&prefill(0), &some(rows(0)))?;
    for step in 1..steps as u64 {
        m.launch_followup(&rows(step))?;
        take(m.collect()?, &mut ahead);
    }
    take(m.collect()?, &mut ahead);

    let mut stepped = vec![vec![]; n];
    take(m.forward_sample(&prefill(n), &some(rows(0)))?, &mut stepped);
    for step in 1..steps as u64 {
        let last: Vec<u32> = stepped.iter().map(|s| s.last().expect("a token").token).collect();
        let chunks: Vec<SeqChunk<'_>> =
            last.iter().enumerate().map(|(i, t)| SeqChunk { slot: n + i, tokens: std::slice::from_ref(t), is_prompt: false }).collect();
        take(m.forward_sample(&chunks, &some(rows(step)))?, &mut stepped);
    }
    Ok((ahead, stepped))
}

/// Tokens equal; logprobs and alternatives within `tol`.
pub fn assert_same_tokens(a: &[Vec<SampledToken>], b: &[Vec<SampledToken>], tol: f32, what: &str) {
    for (seq, (x, y)) in a.iter().zip(b).enumerate() {
        let ids = |v: &[SampledToken]| v.iter().map(|t| t.token).collect::<Vec<_>>();
        assert_eq!(ids(x), ids(y), "{what}: sequence {seq}'s tokens");
        for (s, (p, q)) in x.iter().zip(y).enumerate() {
            assert!((p.logprob - q.logprob).abs() <= tol, "{what}: sequence {seq} step {s}: logprob {} vs {}", p.logprob, q.logprob);
            assert_eq!(p.top.len(), q.top.len(), "{what}: sequence {seq} step {s}: alternatives");
            for (u, v) in p.top.iter().zip(&q.top) {
                assert!(u.0 == v.0 && (u.1 - v.1).abs() <= tol, "{what}: sequence {seq} step {s}: alternative {u:?} vs {v:?}");
            }
        }
    }
}

#[test]
fn follow_up_steps_fed_on_the_device_match_host_fed_steps() -> TestResult {
    for dir in fixture_models() {
        let r = reference(&dir);
        let prompts: Vec<Vec<u32>> = r.prompts.iter().take(4).map(|p| p.ids.clone()).collect();
        let mut m = load_cpu(&dir, opts(2 * prompts.len(), 256))?;
        let (ahead, stepped) = ahead_and_stepped(&mut m, &prompts, 12, &mixed_row)?;
        assert_same_tokens(&ahead, &stepped, 0.0, &name(&dir));
    }
    Ok(())
}

#[test]
fn a_follow_up_needs_a_step_that_sampled_every_chunk() -> TestResult {
    let dir = fixtures_dir().join("mamba1-tiny");
    let mut m = load_cpu(&dir, opts(2, 64))?;
    let vocab = m.config().vocab_size;
    let g = SampleRow::greedy(vocab);
    assert!(m.collect().is_err(), "nothing was launched");
    assert!(m.launch_followup(std::slice::from_ref(&g)).is_err(), "no step ran");
    // A prompt chunk that samples nothing leaves nothing to feed.
    let chunks = [SeqChunk { slot: 0, tokens: &[1, 2, 3], is_prompt: true }, SeqChunk { slot: 1, tokens: &[4], is_prompt: true }];
    m.launch(&chunks, &[None, Some(g.clone())])?;
    assert!(m.launch_followup(&[g.clone(), g.clone()]).is_err(), "chunk 0 sampled nothing");
    // One step at a time refuses to overtake a launched step.
    assert!(m.forward_sample(&chunks[1..], &[Some(g.clone())]).is_err());
    let got = m.collect()?;
    assert!(got[0].is_none() && got[1].is_some());
    // A follow-up's rows are one a sequence of the step it follows.
    m.launch(&chunks, &[Some(g.clone()), Some(g.clone())])?;
    assert!(m.launch_followup(std::slice::from_ref(&g)).is_err(), "two sequences, one row");
    m.collect()?;
    Ok(())
}

/// Submits `requests` to a CPU engine over `dir` and returns each one's
/// events, in submission order, and how many steps it queued ahead.
fn serve_all(
    dir: &std::path::Path,
    slots: usize,
    step_ahead: bool,
    requests: &[Request],
) -> Result<(Vec<Events>, u64), Box<dyn std::error::Error>> {
    let load_dir = dir.to_path_buf();
    let vocab = mamba_serve::model::ModelConfig::from_dir(dir)?.vocab_size;
    let metrics = std::sync::Arc::new(Metrics::default());
    let engine = EngineHandle::spawn(
        move || {
            let m = load_cpu(&load_dir, opts(slots, 32)).map_err(|e| mamba_serve::model::ModelError::Batch(e.to_string()))?;
            Ok(Box::new(m) as Box<dyn Runner>)
        },
        EngineOptions { max_queue: 64, prefill_chunk: 16, valid_vocab: vocab, step_ahead },
        metrics.clone(),
    )?;
    let mut streams = vec![];
    for r in requests {
        streams.push(engine.submit(r.clone())?);
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut out = vec![];
    for mut s in streams {
        let mut events = vec![];
        loop {
            let e = loop {
                match s.try_recv() {
                    Ok(e) => break Some(e),
                    Err(tokio::sync::mpsc::error::TryRecvError::Empty) => {
                        assert!(Instant::now() < deadline, "the engine stopped answering");
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => break None,
                }
            };
            let Some(e) = e else { break };
            let end = matches!(e, Event::Finished { .. } | Event::Failed(_));
            events.push(e);
            if end {
                break;
            }
        }
        out.push(events);
    }
    engine.stop();
    Ok((out, metrics.steps_ahead.load(std::sync::atomic::Ordering::Relaxed)))
}

fn tokens_of(events: &[Event]) -> Vec<u32> {
    events.iter().filter_map(|e| if let Event::Token { id, .. } = e { Some(*id) } else { None }).collect()
}

/// Twenty requests through four slots, queueing, ending by length and by
/// stop ids mid-stream (so steps queued ahead carry sequences that have
/// ended, whose slots new sequences take), with greedy, seeded, penalised
/// and logprob sampling: each gets the events it gets with one step at a
/// time, and greedy ones what offline generation gives.
#[test]
fn the_engine_sends_the_same_with_steps_queued_ahead() -> TestResult {
    let dir = fixtures_dir().join("mamba1-tiny");
    let r = reference(&dir);
    let mut m = load_cpu(&dir, opts(1, 64))?;
    let vocab = m.config().vocab_size;
    let mut requests = vec![];
    let mut greedy_refs = vec![];
    for i in 0..20 {
        // Short prompts, run in one step, and one long one run in chunks
        // beside the others' decode tokens (no step is queued ahead then).
        let prompt = r.prompts[if i == 9 { 3 } else { i % 3 }].ids.clone();
        let max_tokens = 1 + (i * 5) % 23;
        // Penalties need each token before the next step: a batch holding
        // one is not queued ahead, so only a few requests have them.
        let mut params = match i % 4 {
            0 | 2 => SamplingParams::greedy(),
            _ if i % 8 == 7 => SamplingParams { temperature: 0.7, repetition_penalty: 1.3, seed: 5, ..SamplingParams::greedy() },
            _ => SamplingParams { temperature: 0.9, top_p: 0.95, seed: 100 + i as u64, ..SamplingParams::greedy() },
        };
        if i % 5 == 2 {
            params.logprobs = Some(2);
        }
        // Greedy requests stop at the id their reference makes third, when
        // there is one: they end mid-stream.
        let g = offline::generate(&mut m, &prompt, max_tokens, &params, vocab, &[], &mut |_| {})?;
        let stop_ids = if i % 4 == 2 && g.generated.len() > 3 { vec![g.generated[2]] } else { vec![] };
        if params.temperature == 0.0 {
            let end = g.generated.iter().position(|t| stop_ids.contains(t)).unwrap_or(g.generated.len());
            greedy_refs.push((i, g.generated[..end].to_vec()));
        }
        requests.push(Request { prompt, max_tokens, params, stop_ids, arrived: Instant::now() });
    }
    let (ahead, queued_ahead) = serve_all(&dir, 4, true, &requests)?;
    let (stepped, none) = serve_all(&dir, 4, false, &requests)?;
    // Most steps here carry a prompt chunk or a penalised sequence; still,
    // some twenty are queued ahead (the count varies with how submissions
    // and steps interleave).
    assert!(queued_ahead >= 5, "only {queued_ahead} steps were queued ahead");
    assert_eq!(none, 0);
    for (i, (a, s)) in ahead.iter().zip(&stepped).enumerate() {
        assert_eq!(tokens_of(a), tokens_of(s), "request {i}");
        let finish = |ev: &[Event]| ev.iter().find_map(|e| if let Event::Finished { reason, .. } = e { Some(*reason) } else { None });
        assert_eq!(finish(a), finish(s), "request {i}: {a:?}");
        assert!(finish(a).is_some(), "request {i} ended without finishing: {a:?}");
        for (x, y) in a.iter().zip(s) {
            if let (Event::Token { logprob: p, top: u, .. }, Event::Token { logprob: q, top: v, .. }) = (x, y) {
                assert!((p - q).abs() < 1e-4 && u.len() == v.len(), "request {i}: {x:?} vs {y:?}");
            }
        }
    }
    for (i, want) in greedy_refs {
        assert_eq!(tokens_of(&ahead[i]), want, "request {i} against offline generation");
        let stopped = matches!(ahead[i].last(), Some(Event::Finished { reason: FinishReason::StopToken(_), .. }));
        assert_eq!(stopped, !requests[i].stop_ids.is_empty() && want.len() < requests[i].max_tokens, "request {i}: {:?}", ahead[i].last());
    }
    Ok(())
}
