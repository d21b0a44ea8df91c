//! Properties that need no reference: prefill equals stepping, a sequence
//! decodes the same alone and in a mixed batch, slots carry nothing over and
//! can be saved and restored.

use mamba_serve::backend::cpu::CpuBackend;
use mamba_serve::engine::offline;
use mamba_serve::model::{Model, SeqChunk};
use mamba_serve::sampling::{SamplingParams, argmax};

use crate::common::*;

/// Greedy continuation of `prompt` in `slot`, fed by hand.
fn greedy_in_slot(
    m: &mut Model<CpuBackend>,
    slot: usize,
    prompt: &[u32],
    n: usize,
    vocab: usize,
) -> Result<Vec<u32>, Box<dyn std::error::Error>> {
    m.reset_slot(slot)?;
    let mut logits = m.forward(&[SeqChunk { slot, tokens: prompt, is_prompt: true }])?;
    let mut out = vec![];
    for _ in 0..n {
        let t = argmax(&logits[..vocab]) as u32;
        out.push(t);
        logits = m.forward(&[SeqChunk { slot, tokens: &[t], is_prompt: false }])?;
    }
    Ok(out)
}

/// A prompt run whole, in chunks, or one token at a time leaves the same
/// logits and the same continuation.
#[test]
fn prefill_equals_token_by_token_stepping() -> TestResult {
    for dir in fixture_models() {
        let r = reference(&dir);
        let p = r.prompts.iter().max_by_key(|p| p.ids.len()).expect("prompts");
        let mut m = load_cpu(&dir, opts(2, 256))?;
        let vocab = m.config().vocab_size;
        m.reset_slot(0)?;
        let whole = m.forward(&[SeqChunk { slot: 0, tokens: &p.ids, is_prompt: true }])?;
        m.reset_slot(1)?;
        let mut stepped = vec![];
        for t in &p.ids {
            stepped = m.forward(&[SeqChunk { slot: 1, tokens: std::slice::from_ref(t), is_prompt: true }])?;
        }
        let e = rel_err(&stepped, &whole);
        assert!(e < 1e-5, "{}: stepwise vs whole prompt relative error {e:e}", name(&dir));
        let a = greedy_in_slot(&mut m, 0, &p.ids, 16, vocab)?;
        // Continue from the stepped state in slot 1 without resetting it.
        let mut b = vec![];
        let mut logits = stepped;
        for _ in 0..16 {
            let t = argmax(&logits[..vocab]) as u32;
            b.push(t);
            logits = m.forward(&[SeqChunk { slot: 1, tokens: &[t], is_prompt: false }])?;
        }
        assert_eq!(a, b, "{}", name(&dir));
        // And both states are the same after the same tokens.
        let e = rel_err(&m.read_slot(1)?, &m.read_slot(0)?);
        assert!(e < 1e-5, "{}: states differ by {e:e}", name(&dir));
    }
    Ok(())
}

/// Sequences of different prompt lengths, admitted at different steps,
/// prefilled in chunks next to others' decode tokens, give exactly the
/// tokens each gives alone.
#[test]
fn a_sequence_decodes_the_same_alone_and_in_a_mixed_batch() -> TestResult {
    for dir in fixture_models() {
        let r = reference(&dir);
        let prompts: Vec<Vec<u32>> = r.prompts.iter().map(|p| p.ids.clone()).collect();
        let n_new = 12;
        let mut m = load_cpu(&dir, opts(8, 256))?;
        let vocab = r.prompts[0].last_logits.len().min(m.config().vocab_size);
        let alone: Vec<Vec<u32>> = prompts.iter().map(|p| greedy_in_slot(&mut m, 0, p, n_new, vocab)).collect::<Result<_, _>>()?;

        // Sequence i joins at step 2i, in slot 7 - i, prefilling 3 prompt
        // tokens a step next to the others' decode tokens.
        struct Seq {
            slot: usize,
            prompt: Vec<u32>,
            fed: usize,
            out: Vec<u32>,
        }
        let mut seqs: Vec<Seq> = vec![];
        let v = m.config().vocab_size;
        for step in 0.. {
            if step % 2 == 0 && step / 2 < prompts.len() {
                let i = step / 2;
                m.reset_slot(7 - i)?;
                seqs.push(Seq { slot: 7 - i, prompt: prompts[i].clone(), fed: 0, out: vec![] });
            }
            let mut chunks = vec![];
            let mut rows = vec![];
            for (i, s) in seqs.iter().enumerate() {
                if s.out.len() == n_new {
                    continue;
                }
                if s.fed < s.prompt.len() {
                    let end = (s.fed + 3).min(s.prompt.len());
                    chunks.push(SeqChunk { slot: s.slot, tokens: &s.prompt[s.fed..end], is_prompt: true });
                    rows.push((i, end));
                } else {
                    let last = s.out.last().expect("a finished prompt has a first token");
                    chunks.push(SeqChunk { slot: s.slot, tokens: std::slice::from_ref(last), is_prompt: false });
                    rows.push((i, s.fed));
                }
            }
            if chunks.is_empty() {
                if seqs.len() == prompts.len() {
                    break;
                }
                continue;
            }
            let logits = m.forward(&chunks)?;
            for (row, (i, fed)) in rows.into_iter().enumerate() {
                let s = &mut seqs[i];
                s.fed = fed;
                if s.fed == s.prompt.len() {
                    s.out.push(argmax(&logits[row * v..row * v + vocab]) as u32);
                }
            }
            assert!(step < 500, "batched run did not finish");
        }
        for (i, s) in seqs.iter().enumerate() {
            assert_eq!(s.out, alone[i], "{}: prompt {i} alone vs batched", name(&dir));
        }
    }
    Ok(())
}

/// A slot reused after a reset behaves like a fresh one; a saved state
/// restored into another slot continues identically.
#[test]
fn slots_carry_nothing_over_and_restore_exactly() -> TestResult {
    let dir = &fixture_models()[0];
    let r = reference(dir);
    let (a, b) = (&r.prompts[0].ids, &r.prompts[r.prompts.len() - 1].ids);
    let mut m = load_cpu(dir, opts(3, 256))?;
    let vocab = m.config().vocab_size;
    let fresh = greedy_in_slot(&mut m, 2, b, 10, vocab)?;
    greedy_in_slot(&mut m, 0, a, 10, vocab)?;
    let reused = greedy_in_slot(&mut m, 0, b, 10, vocab)?;
    assert_eq!(fresh, reused);

    m.reset_slot(0)?;
    m.forward(&[SeqChunk { slot: 0, tokens: b, is_prompt: true }])?;
    let saved = m.read_slot(0)?;
    assert!(saved.iter().any(|&v| v != 0.0), "a prefilled state is not all zeros");
    m.write_slot(1, &saved)?;
    m.copy_slot(0, 2)?;
    for slot in [1, 2] {
        assert_eq!(m.read_slot(slot)?, saved);
    }
    let step = |m: &mut Model<CpuBackend>, slot: usize| m.forward(&[SeqChunk { slot, tokens: &b[..1], is_prompt: false }]);
    let x = step(&mut m, 0)?;
    let y = step(&mut m, 1)?;
    let z = step(&mut m, 2)?;
    assert_eq!(x, y);
    assert_eq!(x, z);
    Ok(())
}

/// What new buffers hold changes nothing. On a backend whose new buffers
/// hold NaN (as device memory holds what a freed buffer left there), a
/// freshly loaded model's slots all hold the zero state, and a prompt run
/// in a slot nobody reset, then greedy steps, give bit for bit the logits
/// of a backend whose new buffers hold zeros; on every fixture model.
#[test]
fn fresh_buffers_holding_nan_change_nothing() -> TestResult {
    use mamba_serve::model::{Checkpoint, ModelConfig};
    for dir in fixture_models() {
        let r = reference(&dir);
        let mut clean = load_cpu(&dir, opts(3, 256))?;
        let cfg = ModelConfig::from_dir(&dir)?;
        let mut dirty = Model::load(CpuBackend::with_poisoned_allocations(), cfg, &Checkpoint::open(&dir)?, opts(3, 256), &mut |_| {})?;
        for slot in 0..3 {
            let state = dirty.read_slot(slot)?;
            assert!(state.iter().all(|&v| v == 0.0), "{}: slot {slot} of a fresh model is not all zeros", name(&dir));
        }
        let vocab = clean.config().vocab_size;
        let mut tokens = r.prompts[0].ids.clone();
        let mut is_prompt = true;
        for step in 0..5 {
            let chunk = [SeqChunk { slot: 2, tokens: &tokens, is_prompt }];
            let (want, got) = (clean.forward(&chunk)?, dirty.forward(&chunk)?);
            assert!(want == got, "{}: step {step} differs with NaN in new buffers", name(&dir));
            (tokens, is_prompt) = (vec![argmax(&want[..vocab]) as u32], false);
        }
    }
    Ok(())
}

/// The offline generator stops at an end-of-sequence id and never samples
/// padded vocabulary rows.
#[test]
fn offline_generation_respects_eos_and_vocabulary() -> TestResult {
    let dir = &fixture_models()[0];
    let r = reference(dir);
    let p = &r.prompts[0];
    let mut m = load_cpu(dir, opts(1, 256))?;
    // Treat the reference's 5th greedy token as EOS: generation stops there.
    let eos = p.greedy[4];
    let first = p.greedy.iter().position(|&t| t == eos).expect("present");
    let g = offline::generate(&mut m, &p.ids, 32, &SamplingParams::greedy(), 500, &[eos], &mut |_| {})?;
    assert!(g.stopped_by_eos);
    assert_eq!(g.generated, p.greedy[..first]);
    // Sampling hot never leaves the valid vocabulary.
    let hot = SamplingParams { temperature: 5.0, seed: 3, ..Default::default() };
    let g = offline::generate(&mut m, &p.ids, 64, &hot, 17, &[], &mut |_| {})?;
    assert!(g.generated.iter().all(|&t| t < 17), "{:?}", g.generated);
    Ok(())
}
