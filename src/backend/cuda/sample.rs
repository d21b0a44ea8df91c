//! Host side of device sampling (`kernels/sample.cu`): packs each row's
//! parameters and lists into one upload, launches one block per row, and
//! reads back only the tokens and logprobs: the kernels write them into
//! mapped pinned memory, which the host reads once an event says they are
//! there, only when it wants them (so the next step can be queued first).

use cudarc::driver::{CudaEvent, result, sys};

use super::kernels::{Args, Kernel};
use super::{CudaBackend, CudaIds, CudaVec, Scratch};
use crate::backend::{Result, SampleRow, SampledToken, View};

/// u32 words of parameters per row (the P_* layout in sample.cu).
const P_WORDS: usize = 20;
const THREADS: u32 = 1024;
/// Ids a block of the split greedy kernel takes at most
/// (GREEDY_THREADS * GREEDY_UNROLL), and its threads.
const GREEDY_PART: usize = 2048;
const GREEDY_THREADS: u32 = 256;

/// A row the split greedy kernel (`sample_greedy`) takes: temperature 0,
/// no logit bias or penalties, no alternatives.
fn plain_greedy(row: &SampleRow) -> bool {
    row.temperature == 0.0 && row.top_logprobs == 0 && !materialize(row)
}

/// Whether the row's logits must be copied and modified (bias, penalties).
fn materialize(row: &SampleRow) -> bool {
    !row.logit_bias.is_empty() || !row.seen.is_empty()
}

/// Allocates the sampling scratch for `rows` rows of `vocab` logits.
pub fn reserve(be: &CudaBackend, s: &mut Scratch, rows: usize, vocab: usize) -> Result<()> {
    let n = rows * vocab;
    be.ensure(&mut s.proc, n * 4, "sampling logits")?;
    be.ensure(&mut s.keys, n * 4, "sampling keys")?;
    be.ensure(&mut s.weights, n * 8, "sampling weights")?;
    be.ensure(&mut s.params, rows * P_WORDS * 4, "sampling parameters")?;
    be.ensure(&mut s.out, rows * 8 * 4, "sampling output")?;
    be.ensure(&mut s.greedy, n.div_ceil(GREEDY_PART) * 16 + rows * 16, "greedy sampling parts")?;
    zeroed_counters(be, s, rows)
}

/// The split greedy kernel's row counters, at least `rows` of them: zeroed
/// when allocated; the kernel leaves them at zero.
fn zeroed_counters(be: &CudaBackend, s: &mut Scratch, rows: usize) -> Result<()> {
    if s.greedy_counts.bytes < rows * 4 {
        be.ensure(&mut s.greedy_counts, rows * 4, "greedy sampling counters")?;
        // Before any launch uses them (in stream order).
        s.greedy_counts.zero(s.greedy_counts.bytes, "greedy sampling counters")?;
    }
    Ok(())
}

/// The kernels' parameter words for `rows` (P_WORDS a row, then each
/// row's seen counts and logit biases) and how many output words they
/// write.
fn param_words(rows: &[&SampleRow]) -> (Vec<u32>, usize) {
    let mut words = vec![0u32; rows.len() * P_WORDS];
    let mut out_words = 0usize;
    for (i, row) in rows.iter().enumerate() {
        let p = &mut words[i * P_WORDS..(i + 1) * P_WORDS];
        p[0] = row.temperature.to_bits();
        p[1] = row.top_k;
        p[2] = row.top_p.to_bits();
        p[3] = row.min_p.to_bits();
        p[4] = row.repetition_penalty.to_bits();
        p[5] = row.presence_penalty.to_bits();
        p[6] = row.frequency_penalty.to_bits();
        p[7] = row.seed as u32;
        p[8] = (row.seed >> 32) as u32;
        // The step only seeds a draw: greedy rows leave it 0, so their
        // words repeat from step to step and need no upload.
        let step = if row.temperature != 0.0 { row.step } else { 0 };
        p[9] = step as u32;
        p[10] = (step >> 32) as u32;
        p[11] = row.top_logprobs;
        p[12] = row.valid_vocab;
        p[17] = out_words as u32;
        p[18] = materialize(row) as u32;
        out_words += 3 + 2 * row.top_logprobs as usize;
    }
    for (i, row) in rows.iter().enumerate() {
        let seen_off = words.len();
        words.extend(row.seen.iter().flat_map(|&(id, count)| [id, count]));
        let bias_off = words.len();
        words.extend(row.logit_bias.iter().flat_map(|&(id, b)| [id, b.to_bits()]));
        let p = &mut words[i * P_WORDS..(i + 1) * P_WORDS];
        p[13] = seen_off as u32;
        p[14] = row.seen.len() as u32;
        p[15] = bias_off as u32;
        p[16] = row.logit_bias.len() as u32;
    }
    (words, out_words)
}

/// Pinned host memory, mapped into the device's address space, that a
/// started sampling's kernels write their output words into (or a copy
/// after them, with `MAMBA_SERVE_COPY_READBACK`), with the event recorded
/// after them. Kept by the backend between samplings.
pub struct Readback {
    ptr: *mut u32,
    /// The memory's address on the device (it is mapped): the kernels
    /// write their words there, with no copy after them.
    dev: u64,
    /// Words the memory holds.
    cap: usize,
    event: CudaEvent,
}

// SAFETY: the pinned memory is owned by this value; the event is Send.
unsafe impl Send for Readback {}

impl Drop for Readback {
    fn drop(&mut self) {
        // SAFETY: allocated by malloc_host, freed only here (a sampling
        // whose words may still land in it waits first: CudaSampling's
        // drop).
        unsafe {
            let _ = result::free_host(self.ptr as *mut std::ffi::c_void);
        }
    }
}

/// A sampling whose words are on their way to the host.
pub struct CudaSampling {
    readback: Option<Readback>,
    words: usize,
    /// Alternatives asked for, a row.
    tops: Vec<u32>,
}

impl Drop for CudaSampling {
    fn drop(&mut self) {
        // Never finished: let the words land before the memory is freed.
        if let Some(rb) = &self.readback {
            let _ = rb.event.synchronize();
        }
    }
}

/// Pinned memory for `words` output words: a kept one large enough, or a
/// new one.
fn readback(be: &CudaBackend, words: usize) -> Result<Readback> {
    let mut kept = be.readbacks.borrow_mut();
    if let Some(i) = kept.iter().position(|r| r.cap >= words) {
        return Ok(kept.swap_remove(i));
    }
    drop(kept);
    let cap = words.max(1024).next_power_of_two();
    let event = be.ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)).map_err(super::dev("event"))?;
    // SAFETY: a pinned allocation mapped into the device's address space,
    // freed by Readback's drop (which owns it from the next line on).
    let ptr =
        unsafe { result::malloc_host(cap * 4, sys::CU_MEMHOSTALLOC_DEVICEMAP) }.map_err(super::dev("pinned host memory"))? as *mut u32;
    let mut rb = Readback { ptr, dev: 0, cap, event };
    // SAFETY: ptr was allocated with CU_MEMHOSTALLOC_DEVICEMAP just above.
    unsafe { sys::cuMemHostGetDevicePointer_v2(&mut rb.dev, ptr as *mut std::ffi::c_void, 0) }
        .result()
        .map_err(super::dev("mapped host memory"))?;
    Ok(rb)
}

/// Launches the sampling kernels for `rows`, which write their output
/// words into a readback's mapped memory, and records its event; with
/// `feed`, the kernels also write row i's token to `feed[i]`.
pub fn start(be: &CudaBackend, logits: View<'_, CudaVec>, rows: &[&SampleRow], feed: Option<&mut CudaIds>) -> Result<CudaSampling> {
    let tops: Vec<u32> = rows.iter().map(|r| r.top_logprobs).collect();
    if rows.is_empty() {
        return Ok(CudaSampling { readback: None, words: 0, tops });
    }
    let vocab = logits.cols;
    let (words, out_words) = param_words(rows);
    let n = rows.len() * vocab;
    let any_materialize = rows.iter().any(|r| materialize(r));
    let any_draw = rows.iter().any(|r| r.temperature != 0.0);
    let (params, out, proc, keys, weights, fresh) = {
        let mut s = be.scratch.borrow_mut();
        let before = s.params.ptr;
        be.ensure(&mut s.params, words.len() * 4, "sampling parameters")?;
        // The words already on the device, unless the buffer was replaced.
        let fresh = s.params.ptr != before || s.params_words != words || be.resend;
        be.ensure(&mut s.out, out_words * 4, "sampling output")?;
        if any_materialize {
            be.ensure(&mut s.proc, n * 4, "sampling logits")?;
        }
        if any_draw {
            be.ensure(&mut s.keys, n * 4, "sampling keys")?;
            be.ensure(&mut s.weights, n * 8, "sampling weights")?;
        }
        if fresh {
            s.params_words.clear();
        }
        (s.params.ptr, s.out.ptr, s.proc.ptr, s.keys.ptr, s.weights.ptr, fresh)
    };
    if fresh {
        be.upload_bytes(params, super::bytes_of(&words))?;
        be.scratch.borrow_mut().params_words = words;
    }
    let rb = readback(be, out_words)?;
    // The kernels write the words straight into the host's mapped memory,
    // or (MAMBA_SERVE_COPY_READBACK, for comparison) into device memory
    // and a copy takes them to the host.
    let out = if be.copy_readback { out } else { rb.dev };
    let next_ids = match feed {
        Some(ids) => {
            // The device writes these ids: the host no longer knows them.
            ids.written.clear();
            ids.buf.ptr
        }
        None => 0,
    };
    // Both kernels start with the logits, the vocabulary and the parameters.
    let inputs = || Args::new().ptr(logits.buf.at(logits.offset)).i32(logits.stride).u32(vocab as u32).ptr(params);
    let parts = vocab.div_ceil(GREEDY_PART);
    // The last block of a row combines the parts with one thread a part.
    let split = parts > 1 && parts <= GREEDY_THREADS as usize && be.split_greedy;
    if split && rows.iter().all(|r| plain_greedy(r)) {
        let (part_max, part_id, part_se, counts) = greedy_scratch(be, rows.len(), parts)?;
        let a = inputs().ptr(part_max).ptr(part_id).ptr(part_se).ptr(counts).ptr(out).ptr(next_ids);
        be.launch(Kernel::SampleGreedy, a, (rows.len() as u32, parts as u32, 1), GREEDY_THREADS)?;
    } else {
        let a = inputs().ptr(proc).ptr(keys).ptr(weights).ptr(out).ptr(next_ids);
        be.launch(Kernel::SampleRows, a, (rows.len() as u32, 1, 1), THREADS)?;
    }
    be.bind()?;
    if be.copy_readback {
        // SAFETY: the pinned memory holds at least out_words words and is
        // not read, reused or freed before the event recorded after the
        // copy has completed (finish, or CudaSampling's drop).
        let dst = unsafe { std::slice::from_raw_parts_mut(rb.ptr, out_words) };
        unsafe { result::memcpy_dtoh_async(dst, out, be.cu_stream()) }.map_err(super::dev("read"))?;
    }
    rb.event.record(&be.stream).map_err(super::dev("event record"))?;
    Ok(CudaSampling { readback: Some(rb), words: out_words, tops })
}

/// Waits for a started sampling's words and reads each row's token,
/// logprob and alternatives.
pub fn finish(be: &CudaBackend, mut s: CudaSampling) -> Result<Vec<SampledToken>> {
    let Some(rb) = s.readback.take() else { return Ok(vec![]) };
    let waited = rb.event.synchronize().map_err(super::dev("synchronize"));
    let result = waited.map(|()| {
        // SAFETY: the kernels' writes (or the copy) into these words
        // completed before the event above; the memory goes back to the
        // pool only after they are read.
        let got = unsafe { std::slice::from_raw_parts(rb.ptr, s.words) };
        let mut result = Vec::with_capacity(s.tops.len());
        let mut o = 0;
        for &asked in &s.tops {
            let n_top = (got[o + 2] as usize).min(asked as usize);
            let top = (0..n_top).map(|j| (got[o + 3 + 2 * j], f32::from_bits(got[o + 4 + 2 * j]))).collect();
            result.push(SampledToken { token: got[o], logprob: f32::from_bits(got[o + 1]), top });
            o += 3 + 2 * asked as usize;
        }
        result
    });
    be.readbacks.borrow_mut().push(rb);
    result
}

/// The split greedy kernel's part results (f64 sums, f32 maxima, u32 ids)
/// and row counters for `rows` rows of `parts` parts. The counters are
/// zeroed when allocated; the kernel leaves them at zero.
fn greedy_scratch(be: &CudaBackend, rows: usize, parts: usize) -> Result<(u64, u64, u64, u64)> {
    let mut s = be.scratch.borrow_mut();
    let n = rows * parts;
    be.ensure(&mut s.greedy, n * 16, "greedy sampling parts")?;
    zeroed_counters(be, &mut s, rows)?;
    let base = s.greedy.ptr;
    Ok((base + n as u64 * 8, base + n as u64 * 12, base, s.greedy_counts.ptr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_rows_repeat_their_parameters_from_step_to_step() {
        let at = |step: u64, temperature: f32| SampleRow { step, temperature, ..SampleRow::greedy(50_280) };
        let words = |a: &SampleRow, b: &SampleRow| param_words(&[a, b]);
        // Greedy: the step does not reach the device, so the words repeat.
        assert_eq!(words(&at(3, 0.0), &at(9, 0.0)), words(&at(4, 0.0), &at(10, 0.0)));
        // A draw is seeded by its step: the words change with it.
        assert_ne!(words(&at(3, 0.7), &at(9, 0.0)), words(&at(4, 0.7), &at(9, 0.0)));
        let (w, out) = param_words(&[&at(5, 0.7)]);
        assert_eq!((w[9], w[10], out), (5, 0, 3));
    }

    #[test]
    fn only_unprocessed_greedy_rows_without_alternatives_take_the_split_kernel() {
        let g = SampleRow::greedy(50_280);
        assert!(plain_greedy(&g));
        assert!(!plain_greedy(&SampleRow { temperature: 0.7, ..g.clone() }));
        assert!(!plain_greedy(&SampleRow { top_logprobs: 1, ..g.clone() }));
        assert!(!plain_greedy(&SampleRow { logit_bias: vec![(3, 1.0)], ..g.clone() }));
        assert!(!plain_greedy(&SampleRow { seen: vec![(3, 0)], ..g.clone() }));
        // A masked tail of ids is still plain: the kernel masks it.
        assert!(plain_greedy(&SampleRow { valid_vocab: 50_000, ..g }));
    }
}
