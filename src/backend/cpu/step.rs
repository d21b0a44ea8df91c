//! The CPU oracle of the fused Mamba-1 decode step
//! ([`crate::backend::Mamba1StepArgs`]): the same arithmetic as running
//! Falcon's column norms, the dt projection and a one-token scan in turn.

use rayon::prelude::*;

use super::CpuBackend;
use super::math::{silu, softplus};
use super::parallel::SharedMut;
use crate::backend::{Mamba1StepArgs, PAD_SLOT, Packed, ViewMut};

/// `1 / sqrt(mean(x²) + eps)`, accumulated in f64.
fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let ss: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
    (1.0 / (ss / x.len() as f64 + eps as f64).sqrt()) as f32
}

pub fn mamba1_step(args: Mamba1StepArgs<'_, CpuBackend>, batch: &Packed<'_, CpuBackend>, out: ViewMut<'_, Vec<f32>>) {
    let (d, n, r) = (args.x.cols, args.ssm.d_state, args.ssm.dt_rank);
    let layout = args.layout;
    let state = SharedMut::new(args.state.as_mut_slice());
    let (o_off, o_stride) = (out.offset, out.stride);
    let outp = SharedMut::new(out.buf.as_mut_slice());
    let (x, z, xdbl) = (args.x, args.z, args.xdbl);
    (0..batch.n_seqs).into_par_iter().for_each(|s| {
        let row = &xdbl.buf[xdbl.offset + s * xdbl.stride..][..r + 2 * n];
        let mut dt_low = row[..r].to_vec();
        let mut b = row[r..r + n].to_vec();
        let mut c = row[r + n..].to_vec();
        if let Some(eps) = args.ssm.norm_eps {
            for part in [&mut dt_low, &mut b, &mut c] {
                let k = inv_rms(part, eps);
                part.iter_mut().for_each(|v| *v *= k);
            }
        }
        let slot = batch.slots[s];
        let mut h = vec![0.0f32; n];
        for ch in 0..d {
            let w = &args.ssm.dt_proj.data[ch * r..(ch + 1) * r];
            let raw: f32 = w.iter().zip(&dt_low).map(|(a, b)| a * b).sum();
            let step = softplus(raw + args.ssm.dt_bias[ch]);
            let xv = x.buf[x.offset + s * x.stride + ch];
            let base = (slot != PAD_SLOT).then(|| layout.offset(slot as usize, args.layer) + ch * n);
            // SAFETY: slots are distinct across sequences, so this task alone
            // owns this slot's state.
            let st = base.map(|o| unsafe { state.slice(o, n) });
            match &st {
                Some(st) => h.copy_from_slice(st),
                None => h.fill(0.0),
            }
            let a = &args.ssm.a[ch * n..(ch + 1) * n];
            let mut y = 0.0f32;
            for i in 0..n {
                h[i] = (step * a[i]).exp() * h[i] + (step * b[i]) * xv;
                y += h[i] * c[i];
            }
            if let Some(st) = st {
                st.copy_from_slice(&h);
            }
            let zv = z.buf[z.offset + s * z.stride + ch];
            // SAFETY: row s belongs to this task.
            unsafe { outp.write(o_off + s * o_stride + ch, (y + xv * args.ssm.skip[ch]) * silu(zv)) };
        }
    });
}
