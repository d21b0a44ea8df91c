//! Load progress for people: a progress bar on a terminal, a log line every
//! tenth of the bytes otherwise (containers, CI, files).

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

use crate::model::LoadProgress;

/// A callback for `model::load` that reports how far the upload has got.
pub fn reporter(label: &str) -> impl FnMut(LoadProgress) + Send + 'static {
    let label = label.to_string();
    let mut bar: Option<ProgressBar> = None;
    let terminal = std::io::stderr().is_terminal();
    let mut next = 0.0;
    move |p: LoadProgress| {
        if terminal {
            let b = bar.get_or_insert_with(|| {
                let b = ProgressBar::new(p.bytes_total);
                b.set_style(
                    ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes} ({eta})")
                        .expect("the progress template is valid")
                        .progress_chars("=> "),
                );
                b.set_message(label.clone());
                b
            });
            b.set_position(p.bytes_done);
            if p.tensors_done == p.tensors_total {
                b.finish_and_clear();
            }
        } else {
            let frac = p.bytes_done as f64 / p.bytes_total.max(1) as f64;
            if frac >= next || p.tensors_done == p.tensors_total {
                tracing::info!(
                    model = %label,
                    tensors = p.tensors_done,
                    of = p.tensors_total,
                    mb = p.bytes_done / 1_000_000,
                    total_mb = p.bytes_total / 1_000_000,
                    "loading weights"
                );
                next = (frac + 0.1).min(1.0);
            }
        }
    }
}
