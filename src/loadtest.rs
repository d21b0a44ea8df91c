//! `mamba-serve loadtest`: a closed-loop load generator for any
//! OpenAI-compatible completions endpoint. `concurrency` clients send
//! `requests` requests in all and report throughput, time to first token,
//! inter-token latency and end-to-end latency percentiles, and errors by
//! kind.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::Serialize;
use serde_json::json;

/// What to send.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Base URL, e.g. `http://127.0.0.1:8080`.
    pub url: String,
    pub model: Option<String>,
    pub api_key: Option<String>,
    pub concurrency: usize,
    pub requests: usize,
    /// Words in each prompt (about one token each for common tokenizers).
    pub prompt_len: usize,
    pub max_tokens: usize,
    pub stream: bool,
    pub timeout: Duration,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Percentiles {
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    fn of(mut v: Vec<f64>) -> Self {
        if v.is_empty() {
            return Percentiles::default();
        }
        v.sort_by(f64::total_cmp);
        let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
        Percentiles { mean: v.iter().sum::<f64>() / v.len() as f64, p50: at(0.5), p90: at(0.9), p99: at(0.99), max: v[v.len() - 1] }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    pub url: String,
    pub concurrency: usize,
    pub requests: usize,
    pub prompt_len: usize,
    pub max_tokens: usize,
    pub stream: bool,
    pub duration_s: f64,
    pub completed: usize,
    pub failed: usize,
    pub errors: BTreeMap<String, usize>,
    pub requests_per_s: f64,
    pub output_tokens: usize,
    pub output_tokens_per_s: f64,
    pub prompt_tokens: usize,
    pub ttft_ms: Percentiles,
    pub itl_ms: Percentiles,
    pub e2e_ms: Percentiles,
}

/// One request's outcome.
struct Outcome {
    error: Option<String>,
    ttft: Option<f64>,
    gaps: Vec<f64>,
    e2e: f64,
    output_tokens: usize,
    prompt_tokens: usize,
}

const WORDS: &[&str] = &["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "and", "runs", "away", "into", "forest"];

fn prompt(len: usize, salt: usize) -> String {
    (0..len).map(|i| WORDS[(i * 7 + salt) % WORDS.len()]).collect::<Vec<_>>().join(" ")
}

async fn one(client: &reqwest::Client, spec: &LoadSpec, i: usize) -> Outcome {
    let start = Instant::now();
    let mut body = json!({
        "prompt": prompt(spec.prompt_len, i),
        "max_tokens": spec.max_tokens,
        "temperature": 0,
        "ignore_eos": true,
        "stream": spec.stream,
    });
    if spec.stream {
        body["stream_options"] = json!({"include_usage": true});
    }
    if let Some(m) = &spec.model {
        body["model"] = json!(m);
    }
    let mut req = client.post(format!("{}/v1/completions", spec.url.trim_end_matches('/'))).json(&body);
    if let Some(k) = &spec.api_key {
        req = req.bearer_auth(k);
    }
    let fail = |e: String| Outcome {
        error: Some(e),
        ttft: None,
        gaps: vec![],
        e2e: start.elapsed().as_secs_f64(),
        output_tokens: 0,
        prompt_tokens: 0,
    };
    let res = match req.send().await {
        Ok(r) => r,
        Err(e) if e.is_timeout() => return fail("timeout".into()),
        Err(e) if e.is_connect() => return fail("connect".into()),
        Err(_) => return fail("transport".into()),
    };
    let status = res.status().as_u16();
    if status != 200 {
        return fail(format!("http_{status}"));
    }
    if !spec.stream {
        return match res.json::<serde_json::Value>().await {
            Ok(v) => {
                let e2e = start.elapsed().as_secs_f64();
                Outcome {
                    error: None,
                    ttft: Some(e2e),
                    gaps: vec![],
                    e2e,
                    output_tokens: v["usage"]["completion_tokens"].as_u64().unwrap_or(0) as usize,
                    prompt_tokens: v["usage"]["prompt_tokens"].as_u64().unwrap_or(0) as usize,
                }
            }
            Err(_) => fail("bad_body".into()),
        };
    }
    let mut stream = res.bytes_stream();
    let mut buf = String::new();
    let (mut ttft, mut last, mut gaps) = (None, None::<Instant>, vec![]);
    let (mut output_tokens, mut prompt_tokens, mut done) = (0, 0, false);
    while let Some(chunk) = stream.next().await {
        let Ok(chunk) = chunk else { return fail("stream_cut".into()) };
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let Some(data) = event.lines().find_map(|l| l.strip_prefix("data: ")) else { continue };
            if data == "[DONE]" {
                done = true;
                continue;
            }
            let Ok(v) = serde_json::from_str::<serde_json::Value>(data) else { return fail("bad_event".into()) };
            if v.get("error").is_some() {
                return fail("stream_error".into());
            }
            if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                output_tokens = u["completion_tokens"].as_u64().unwrap_or(0) as usize;
                prompt_tokens = u["prompt_tokens"].as_u64().unwrap_or(0) as usize;
            }
            let has_text = v["choices"].get(0).and_then(|c| c["text"].as_str()).is_some_and(|t| !t.is_empty());
            if has_text {
                let now = Instant::now();
                match last {
                    None => ttft = Some(now.duration_since(start).as_secs_f64()),
                    Some(prev) => gaps.push(now.duration_since(prev).as_secs_f64()),
                }
                last = Some(now);
            }
        }
    }
    if !done {
        return fail("no_done".into());
    }
    Outcome { error: None, ttft, gaps, e2e: start.elapsed().as_secs_f64(), output_tokens, prompt_tokens }
}

/// Runs the load and reports.
pub async fn run(spec: LoadSpec) -> LoadReport {
    let client = reqwest::Client::builder().timeout(spec.timeout).build().expect("an HTTP client with default TLS-less settings builds");
    let next = Arc::new(AtomicUsize::new(0));
    let spec = Arc::new(spec);
    let start = Instant::now();
    let workers: Vec<_> = (0..spec.concurrency.max(1))
        .map(|_| {
            let (client, next, spec) = (client.clone(), next.clone(), spec.clone());
            tokio::spawn(async move {
                let mut out = vec![];
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= spec.requests {
                        break out;
                    }
                    out.push(one(&client, &spec, i).await);
                }
            })
        })
        .collect();
    let mut outcomes = vec![];
    for w in workers {
        outcomes.extend(w.await.unwrap_or_default());
    }
    let duration = start.elapsed().as_secs_f64();
    let mut errors = BTreeMap::new();
    let (mut ttft, mut itl, mut e2e) = (vec![], vec![], vec![]);
    let (mut output_tokens, mut prompt_tokens) = (0, 0);
    for o in &outcomes {
        match &o.error {
            Some(e) => *errors.entry(e.clone()).or_insert(0) += 1,
            None => {
                ttft.extend(o.ttft.map(|t| t * 1e3));
                itl.extend(o.gaps.iter().map(|g| g * 1e3));
                e2e.push(o.e2e * 1e3);
                output_tokens += o.output_tokens;
                prompt_tokens += o.prompt_tokens;
            }
        }
    }
    let failed = errors.values().sum();
    LoadReport {
        url: spec.url.clone(),
        concurrency: spec.concurrency,
        requests: spec.requests,
        prompt_len: spec.prompt_len,
        max_tokens: spec.max_tokens,
        stream: spec.stream,
        duration_s: duration,
        completed: outcomes.len() - failed,
        failed,
        errors,
        requests_per_s: (outcomes.len() - failed) as f64 / duration,
        output_tokens,
        output_tokens_per_s: output_tokens as f64 / duration,
        prompt_tokens,
        ttft_ms: Percentiles::of(ttft),
        itl_ms: Percentiles::of(itl),
        e2e_ms: Percentiles::of(e2e),
    }
}

/// The report as a plain-text table.
pub fn table(r: &LoadReport) -> String {
    let mut s = format!(
        "{} requests ({} concurrent, prompt {} words, {} tokens out, stream {}) in {:.2} s\n",
        r.requests, r.concurrency, r.prompt_len, r.max_tokens, r.stream, r.duration_s
    );
    s.push_str(&format!(
        "completed {}  failed {}  {:.2} req/s  {:.1} output tokens/s\n",
        r.completed, r.failed, r.requests_per_s, r.output_tokens_per_s
    ));
    for (k, v) in &r.errors {
        s.push_str(&format!("  error {k}: {v}\n"));
    }
    s.push_str("latency (ms)       mean      p50      p90      p99      max\n");
    for (name, p) in [("time to 1st token", &r.ttft_ms), ("inter-token", &r.itl_ms), ("end to end", &r.e2e_ms)] {
        s.push_str(&format!("{name:<17} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2}\n", p.mean, p.p50, p.p90, p.p99, p.max));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_known_set() {
        let p = Percentiles::of((1..=100).map(f64::from).collect());
        assert_eq!((p.p50, p.p90, p.p99, p.max), (51.0, 90.0, 99.0, 100.0));
        assert!((p.mean - 50.5).abs() < 1e-9);
        assert_eq!(Percentiles::of(vec![]).max, 0.0);
    }
}
