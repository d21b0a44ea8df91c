//! The scheduler: a pure planner. Given the running sequences and the step
//! limits it decides what each sequence contributes to the next step. No
//! I/O, no device, no clock.
//!
//! Policy: every decoding sequence gets its one token first (so streams
//! never stall behind prompts); the remaining token budget goes to prompt
//! chunks in admission order, each at most `prefill_chunk` tokens. When
//! more sequences decode than the budget allows, the starting point rotates
//! so every stream advances.

/// What the planner needs to know of one running sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqState {
    /// Prompt tokens not yet run.
    pub prompt_left: usize,
}

/// Step limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub max_tokens: usize,
    pub max_seqs: usize,
    pub prefill_chunk: usize,
}

/// One sequence's part in a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanItem {
    /// Index into the planner's input.
    pub seq: usize,
    /// Tokens it runs this step.
    pub tokens: usize,
    /// True for a decode token, false for a prompt chunk.
    pub decode: bool,
}

/// Plans one step. `rotation` (e.g. the step counter) picks where the
/// decode round starts when not all decoders fit.
pub fn plan(seqs: &[SeqState], budget: Budget, rotation: usize) -> Vec<PlanItem> {
    let mut items = Vec::new();
    let mut tokens = 0;
    let decoders: Vec<usize> = (0..seqs.len()).filter(|&i| seqs[i].prompt_left == 0).collect();
    let n = decoders.len();
    for k in 0..n {
        if items.len() == budget.max_seqs || tokens == budget.max_tokens {
            break;
        }
        let seq = decoders[(rotation + k) % n];
        items.push(PlanItem { seq, tokens: 1, decode: true });
        tokens += 1;
    }
    for (seq, s) in seqs.iter().enumerate() {
        if s.prompt_left == 0 {
            continue;
        }
        if items.len() == budget.max_seqs || tokens == budget.max_tokens {
            break;
        }
        let take = s.prompt_left.min(budget.prefill_chunk).min(budget.max_tokens - tokens);
        items.push(PlanItem { seq, tokens: take, decode: false });
        tokens += take;
    }
    items
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: Budget = Budget { max_tokens: 16, max_seqs: 8, prefill_chunk: 6 };

    fn s(prompt_left: usize) -> SeqState {
        SeqState { prompt_left }
    }

    #[test]
    fn decoders_first_then_prompt_chunks_in_order() {
        let p = plan(&[s(10), s(0), s(3), s(0)], B, 0);
        assert_eq!(
            p,
            vec![
                PlanItem { seq: 1, tokens: 1, decode: true },
                PlanItem { seq: 3, tokens: 1, decode: true },
                PlanItem { seq: 0, tokens: 6, decode: false },
                PlanItem { seq: 2, tokens: 3, decode: false },
            ]
        );
    }

    #[test]
    fn a_long_prompt_is_chunked_and_never_exceeds_the_budget() {
        let p = plan(&[s(100), s(0), s(0)], Budget { max_tokens: 5, max_seqs: 8, prefill_chunk: 64 }, 0);
        assert_eq!(p.iter().map(|i| i.tokens).sum::<usize>(), 5);
        assert_eq!(p[2], PlanItem { seq: 0, tokens: 3, decode: false });
    }

    #[test]
    fn decode_rotates_when_not_all_fit() {
        let seqs = [s(0); 5];
        let b = Budget { max_tokens: 2, max_seqs: 8, prefill_chunk: 4 };
        let mut counts = [0; 5];
        for step in 0..10 {
            for i in plan(&seqs, b, step) {
                counts[i.seq] += 1;
            }
        }
        assert_eq!(counts, [4; 5]);
    }

    #[test]
    fn sequence_limit_holds() {
        let p = plan(&[s(0), s(0), s(2), s(2)], Budget { max_tokens: 100, max_seqs: 3, prefill_chunk: 4 }, 0);
        assert_eq!(p.len(), 3);
    }

    #[test]
    fn empty_input_plans_nothing() {
        assert!(plan(&[], B, 3).is_empty());
    }
}
