//! The CPU backend against Hugging Face transformers' float32 outputs on the
//! committed tiny models (see tests/fixtures/README.md).

use mamba_serve::engine::offline;
use mamba_serve::model::SeqChunk;
use mamba_serve::sampling::SamplingParams;
use mamba_serve::tokenizer::Tokenizer;

use crate::common::*;

/// Last-position logits of every prompt, prompt in one chunk.
#[test]
fn prompt_logits_match_the_reference() -> TestResult {
    for dir in fixture_models() {
        let r = reference(&dir);
        let mut m = load_cpu(&dir, opts(1, 256))?;
        for p in &r.prompts {
            m.reset_slot(0)?;
            let logits = m.forward(&[SeqChunk { slot: 0, tokens: &p.ids, is_prompt: true }])?;
            let e = rel_err(&logits, &p.last_logits);
            assert!(e < 1e-4, "{}: prompt {:?}: relative error {e:e}", name(&dir), p.text);
        }
    }
    Ok(())
}

/// The same with the prompt split into chunks of 5 tokens (chunked prefill).
#[test]
fn chunked_prompt_logits_match_the_reference() -> TestResult {
    for dir in fixture_models() {
        let r = reference(&dir);
        let mut m = load_cpu(&dir, opts(1, 5))?;
        for p in &r.prompts {
            m.reset_slot(0)?;
            let mut logits = vec![];
            for piece in p.ids.chunks(5) {
                logits = m.forward(&[SeqChunk { slot: 0, tokens: piece, is_prompt: true }])?;
            }
            let e = rel_err(&logits, &p.last_logits);
            assert!(e < 1e-4, "{}: prompt {:?}: relative error {e:e}", name(&dir), p.text);
        }
    }
    Ok(())
}

/// Greedy continuations are identical, and the first decode steps' logits
/// match.
#[test]
fn greedy_continuations_match_the_reference() -> TestResult {
    for dir in fixture_models() {
        let r = reference(&dir);
        let tok = Tokenizer::from_dir(&dir)?;
        let mut m = load_cpu(&dir, opts(1, 256))?;
        let vocab = tok.vocab_size();
        for p in &r.prompts {
            let g = offline::generate(&mut m, &p.ids, p.greedy.len(), &SamplingParams::greedy(), vocab, &[], &mut |_| {})?;
            assert_eq!(g.generated, p.greedy, "{}: prompt {:?}", name(&dir), p.text);
            // Decode-step logits: feed the reference's tokens one at a time.
            m.reset_slot(0)?;
            m.forward(&[SeqChunk { slot: 0, tokens: &p.ids, is_prompt: true }])?;
            for (i, want) in p.step_logits.iter().enumerate() {
                let logits = m.forward(&[SeqChunk { slot: 0, tokens: &p.greedy[i..i + 1], is_prompt: false }])?;
                let e = rel_err(&logits, want);
                assert!(e < 1e-4, "{}: prompt {:?}: decode step {} relative error {e:e}", name(&dir), p.text, i + 1);
            }
        }
        assert!(!r.prompts.is_empty(), "{} has no prompts", r.model_type);
    }
    Ok(())
}

/// Our tokenizer gives the reference's ids, and decodes them back.
#[test]
fn tokenizer_matches_the_reference() -> TestResult {
    for dir in fixture_models() {
        let r = reference(&dir);
        let tok = Tokenizer::from_dir(&dir)?;
        for p in &r.prompts {
            assert_eq!(tok.encode(&p.text)?, p.ids, "{}: {:?}", name(&dir), p.text);
            assert_eq!(tok.decode(&p.ids, false)?, p.text);
        }
    }
    Ok(())
}

/// The bundled default model: our greedy continuation of its card's prompt
/// is transformers' (recorded in its training log).
#[test]
fn the_default_model_generates_what_transformers_generates() -> TestResult {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(mamba_serve::DEFAULT_MODEL_DIR);
    let log: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("training_log.json"))?)?;
    let samples = &log["samples"];
    let prompt: Vec<u32> = serde_json::from_value(samples["prompt_token_ids"].clone())?;
    let want: Vec<u32> = serde_json::from_value(samples["greedy_token_ids"].clone())?;
    assert!(want.len() >= 100, "the log holds a long greedy sample");
    let tok = Tokenizer::from_dir(&dir)?;
    assert_eq!(tok.encode(samples["prompt"].as_str().expect("prompt"))?, prompt);
    let mut m = load_cpu(&dir, opts(1, 256))?;
    let g = offline::generate(&mut m, &prompt, want.len(), &SamplingParams::greedy(), tok.vocab_size(), &[0], &mut |_| {})?;
    assert_eq!(g.generated, want);
    Ok(())
}
