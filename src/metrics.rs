//! Process metrics in Prometheus text format. A leaf: the engine and the
//! API update it through a shared `Arc<Metrics>`; nothing here knows either.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// A histogram with fixed upper bounds (seconds).
pub struct Histogram {
    bounds: &'static [f64],
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    /// Sum in nanoseconds (so it can be an atomic integer).
    sum_ns: AtomicU64,
}

const LATENCY_BOUNDS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_ns: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, seconds: f64) {
        for (b, bucket) in self.bounds.iter().zip(&self.buckets) {
            if seconds <= *b {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add((seconds.max(0.0) * 1e9) as u64, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, bucket) in self.bounds.iter().zip(&self.buckets) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {}", bucket.load(Ordering::Relaxed));
        }
        let n = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {n}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9);
        let _ = writeln!(out, "{name}_count {n}");
    }
}

/// Every metric the server exports.
pub struct Metrics {
    /// (endpoint, status) → count.
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    pub queue_depth: AtomicI64,
    pub running: AtomicI64,
    pub slots_used: AtomicI64,
    pub slots_total: AtomicI64,
    pub state_bytes_per_slot: AtomicI64,
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub cancelled: AtomicU64,
    pub engine_errors: AtomicU64,
    /// Decode steps queued before the last step's tokens were read.
    pub steps_ahead: AtomicU64,
    pub ttft: Histogram,
    pub inter_token: Histogram,
    pub step: Histogram,
    pub queue_wait: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Mutex::new(BTreeMap::new()),
            queue_depth: AtomicI64::new(0),
            running: AtomicI64::new(0),
            slots_used: AtomicI64::new(0),
            slots_total: AtomicI64::new(0),
            state_bytes_per_slot: AtomicI64::new(0),
            prompt_tokens: AtomicU64::new(0),
            generated_tokens: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            engine_errors: AtomicU64::new(0),
            steps_ahead: AtomicU64::new(0),
            ttft: Histogram::new(LATENCY_BOUNDS),
            inter_token: Histogram::new(LATENCY_BOUNDS),
            step: Histogram::new(LATENCY_BOUNDS),
            queue_wait: Histogram::new(LATENCY_BOUNDS),
        }
    }
}

impl Metrics {
    pub fn count_request(&self, endpoint: &str, status: u16) {
        let mut m = self.requests.lock().expect("metrics lock is never poisoned: no code panics while holding it");
        *m.entry((endpoint.to_string(), status)).or_insert(0) += 1;
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# HELP mamba_requests_total HTTP requests by endpoint and status.\n# TYPE mamba_requests_total counter");
        for ((endpoint, status), n) in self.requests.lock().expect("metrics lock is never poisoned").iter() {
            let _ = writeln!(out, "mamba_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}");
        }
        let gauges = [
            ("mamba_queue_depth", "Requests waiting for a state slot.", &self.queue_depth),
            ("mamba_running_sequences", "Sequences holding a state slot.", &self.running),
            ("mamba_slots_used", "State slots in use.", &self.slots_used),
            ("mamba_slots_total", "State slots in the pool.", &self.slots_total),
            ("mamba_state_bytes_per_slot", "Bytes of recurrent state one sequence holds.", &self.state_bytes_per_slot),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}", v.load(Ordering::Relaxed));
        }
        let counters = [
            ("mamba_prompt_tokens_total", "Prompt tokens processed.", &self.prompt_tokens),
            ("mamba_generated_tokens_total", "Tokens generated.", &self.generated_tokens),
            ("mamba_cancelled_total", "Sequences cancelled by their client.", &self.cancelled),
            ("mamba_engine_errors_total", "Failed engine steps.", &self.engine_errors),
            ("mamba_steps_ahead_total", "Decode steps queued on the device before the last step's tokens were read.", &self.steps_ahead),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", v.load(Ordering::Relaxed));
        }
        self.ttft.render(&mut out, "mamba_time_to_first_token_seconds", "Time from arrival to the first generated token.");
        self.inter_token.render(&mut out, "mamba_inter_token_latency_seconds", "Time between consecutive tokens of a sequence.");
        self.step.render(&mut out, "mamba_step_seconds", "Duration of one engine step.");
        self.queue_wait.render(&mut out, "mamba_queue_wait_seconds", "Time a request waited for a state slot.");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_has_counts_gauges_and_cumulative_buckets() {
        let m = Metrics::default();
        m.count_request("/v1/completions", 200);
        m.count_request("/v1/completions", 200);
        m.slots_total.store(8, Ordering::Relaxed);
        m.ttft.observe(0.003);
        m.ttft.observe(0.2);
        let text = m.render();
        assert!(text.contains("mamba_requests_total{endpoint=\"/v1/completions\",status=\"200\"} 2"));
        assert!(text.contains("mamba_slots_total 8"));
        assert!(text.contains("mamba_time_to_first_token_seconds_bucket{le=\"0.005\"} 1"));
        assert!(text.contains("mamba_time_to_first_token_seconds_bucket{le=\"0.25\"} 2"));
        assert!(text.contains("mamba_time_to_first_token_seconds_count 2"));
    }
}
