//! The real server on a loopback socket: concurrent streams, disconnects,
//! overload, drain on SIGTERM, protocol abuse, and the official `openai`
//! Python client.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};

use mamba_serve::config::Settings;
use mamba_serve::engine::offline;
use mamba_serve::sampling::SamplingParams;
use mamba_serve::tokenizer::Tokenizer;

use crate::common::*;
use crate::http::settings;

/// Starts the server in this process on 127.0.0.1:0.
async fn start(edit: impl FnOnce(&mut Settings)) -> SocketAddr {
    let srv = mamba_serve::build(&settings(edit)).expect("builds");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, srv.router).await });
    addr
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().pool_max_idle_per_host(0).build().expect("client")
}

/// Reads a whole SSE response into its data payloads.
async fn read_sse(res: reqwest::Response) -> Vec<String> {
    let body = res.bytes().await.expect("body");
    crate::http::sse_data(&body)
}

/// The concatenated text and finish reason of completion chunks.
fn text_of(events: &[String]) -> (String, Option<String>) {
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "stream ends with [DONE]: {events:?}");
    let mut text = String::new();
    let mut finish = None;
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).expect("JSON chunk");
        assert!(v.get("error").is_none(), "error event: {v}");
        if let Some(c) = v["choices"].get(0) {
            text.push_str(c["text"].as_str().unwrap_or(""));
            if let Some(f) = c["finish_reason"].as_str() {
                finish = Some(f.to_string());
            }
        }
    }
    (text, finish)
}

async fn metric(addr: SocketAddr, name: &str) -> f64 {
    let text = client().get(format!("http://{addr}/metrics")).send().await.expect("metrics").text().await.expect("text");
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("metric {name} missing"))
}

async fn wait_metric(addr: SocketAddr, name: &str, want: f64, within: Duration) {
    let start = Instant::now();
    loop {
        let v = metric(addr, name).await;
        if v == want {
            return;
        }
        assert!(start.elapsed() < within, "{name} stayed {v}, wanted {want}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thirty_two_concurrent_streams_each_get_their_solo_tokens() -> TestResult {
    let addr = start(|s| {
        s.engine.slots = 8;
        s.engine.max_queue = 64;
        s.engine.max_batch_tokens = 64;
        s.engine.prefill_chunk = 16;
    })
    .await;
    let dir = fixtures_dir().join("mamba1-tiny");
    let tok = Tokenizer::from_dir(&dir)?;
    let texts = [
        "The",
        "Le café est très bon",
        "你好世界",
        "Once upon a time there was a little robot who wanted to learn",
        "🙂🚀",
        "Über den Wolken",
        "x = y + 1;",
        "hello world, good morning",
    ];
    // The reference for every (prompt, length): generated alone, offline.
    let mut m = load_cpu(&dir, opts(1, 256))?;
    let mut cases = vec![];
    for i in 0..32 {
        let prompt = texts[i % texts.len()];
        let max_tokens = 5 + (i * 7) % 40;
        let ids = tok.encode(prompt)?;
        let g = offline::generate(&mut m, &ids, max_tokens, &SamplingParams::greedy(), tok.vocab_size(), &[], &mut |_| {})?;
        cases.push((prompt, max_tokens, tok.decode(&g.generated, true)?));
    }
    let c = client();
    let tasks: Vec<_> = cases
        .iter()
        .map(|(prompt, max_tokens, _)| {
            let c = c.clone();
            let body = json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": true, "ignore_eos": true});
            tokio::spawn(async move {
                let res = c.post(format!("http://{addr}/v1/completions")).json(&body).send().await.expect("send");
                assert_eq!(res.status(), 200);
                read_sse(res).await
            })
        })
        .collect();
    for (task, (prompt, _, want)) in tasks.into_iter().zip(&cases) {
        let events = task.await?;
        let (text, finish) = text_of(&events);
        assert_eq!(&text, want, "prompt {prompt:?}");
        assert_eq!(finish.as_deref(), Some("length"));
    }
    wait_metric(addr, "mamba_slots_used", 0.0, Duration::from_secs(2)).await;
    Ok(())
}

/// A seeded, sampled request gives the same text alone and while other
/// sequences (seeded differently, of other lengths) share its steps.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_seeded_request_samples_the_same_whatever_else_is_in_the_batch() -> TestResult {
    let addr = start(|s| s.engine.slots = 8).await;
    let c = client();
    let body = |prompt: &str, seed: u64, n: usize| json!({"prompt": prompt, "max_tokens": n, "temperature": 1.0, "top_p": 0.9, "seed": seed, "ignore_eos": true});
    let alone: Value = c.post(format!("http://{addr}/v1/completions")).json(&body("Once upon a time", 42, 40)).send().await?.json().await?;
    let others: Vec<_> = (0..6)
        .map(|i| {
            let c = c.clone();
            let b = body(["The", "Le café", "你好", "x = y"][i % 4], 100 + i as u64, 20 + 7 * i);
            tokio::spawn(async move { c.post(format!("http://{addr}/v1/completions")).json(&b).send().await.expect("send").status() })
        })
        .collect();
    let together: Value =
        c.post(format!("http://{addr}/v1/completions")).json(&body("Once upon a time", 42, 40)).send().await?.json().await?;
    for o in others {
        assert_eq!(o.await?, 200);
    }
    assert_eq!(alone["choices"][0]["text"], together["choices"][0]["text"]);
    assert!(!alone["choices"][0]["text"].as_str().unwrap_or("").is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_disconnects_frees_its_slot() -> TestResult {
    let addr = start(|s| {
        s.engine.slots = 1;
        s.engine.max_total_tokens = 100_000;
    })
    .await;
    let c = client();
    let long = json!({"prompt": "The", "max_tokens": 90_000, "temperature": 0, "stream": true, "ignore_eos": true});
    // Mid-stream: read one chunk, then hang up.
    let res = c.post(format!("http://{addr}/v1/completions")).json(&long).send().await?;
    assert_eq!(res.status(), 200);
    let mut body = res.bytes_stream();
    body.next().await.expect("a first chunk")?;
    assert_eq!(metric(addr, "mamba_slots_used").await, 1.0);
    drop(body);
    wait_metric(addr, "mamba_slots_used", 0.0, Duration::from_secs(2)).await;

    // Non-streamed: the handler's future is dropped with the connection.
    let mut sock = TcpStream::connect(addr)?;
    let payload = json!({"prompt": "The", "max_tokens": 90_000, "temperature": 0, "ignore_eos": true}).to_string();
    write!(
        sock,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{payload}",
        payload.len()
    )?;
    wait_metric(addr, "mamba_slots_used", 1.0, Duration::from_secs(2)).await;
    drop(sock);
    wait_metric(addr, "mamba_slots_used", 0.0, Duration::from_secs(2)).await;

    // While queued behind a busy slot: never admitted, never runs.
    let busy = c.post(format!("http://{addr}/v1/completions")).json(&long).send().await?;
    let mut busy_body = busy.bytes_stream();
    busy_body.next().await.expect("chunk")?;
    let queued = tokio::spawn({
        let c = c.clone();
        let long = long.clone();
        async move { c.post(format!("http://{addr}/v1/completions")).json(&long).send().await }
    });
    wait_metric(addr, "mamba_queue_depth", 1.0, Duration::from_secs(2)).await;
    queued.abort();
    let _ = queued.await;
    drop(busy_body);
    wait_metric(addr, "mamba_slots_used", 0.0, Duration::from_secs(2)).await;
    wait_metric(addr, "mamba_queue_depth", 0.0, Duration::from_secs(2)).await;
    assert!(metric(addr, "mamba_cancelled_total").await >= 4.0);

    // The freed slot serves the next request normally.
    let v: Value =
        c.post(format!("http://{addr}/v1/completions")).json(&json!({"prompt": "The", "max_tokens": 3})).send().await?.json().await?;
    assert_eq!(v["usage"]["completion_tokens"].as_u64().map(|n| n <= 3), Some(true));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overload_gets_429_at_once_and_every_accepted_request_completes() -> TestResult {
    let addr = start(|s| {
        s.engine.slots = 2;
        s.engine.max_queue = 2;
    })
    .await;
    let c = client();
    let tasks: Vec<_> = (0..24)
        .map(|i| {
            let c = c.clone();
            let body = json!({"prompt": format!("request {i}"), "max_tokens": 60, "temperature": 0, "stream": true, "ignore_eos": true});
            tokio::spawn(async move {
                let res = c.post(format!("http://{addr}/v1/completions")).json(&body).send().await.expect("send");
                let status = res.status().as_u16();
                if status == 429 {
                    assert!(res.headers().contains_key("retry-after"));
                    let v: Value = res.json().await.expect("json");
                    assert_eq!(v["error"]["code"], "server_overloaded");
                    (status, None)
                } else {
                    (status, Some(read_sse(res).await))
                }
            })
        })
        .collect();
    let (mut ok, mut refused) = (0, 0);
    for t in tasks {
        match tokio::time::timeout(Duration::from_secs(60), t).await?? {
            (200, Some(events)) => {
                let (_, finish) = text_of(&events);
                assert_eq!(finish.as_deref(), Some("length"));
                ok += 1;
            }
            (429, None) => refused += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(ok + refused, 24);
    assert!(refused > 0, "the queue never filled");
    // A burst may arrive before the engine pulls anything from the queue, so
    // only the queue's capacity is sure to be accepted.
    assert!(ok >= 2, "at least the queue's capacity was served");
    wait_metric(addr, "mamba_slots_used", 0.0, Duration::from_secs(2)).await;
    wait_metric(addr, "mamba_queue_depth", 0.0, Duration::from_secs(2)).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_requests_during_streams_change_nothing() -> TestResult {
    let addr = start(|s| s.engine.slots = 4).await;
    let c = client();
    let good = json!({"prompt": "Once upon a time", "max_tokens": 30, "temperature": 0, "stream": true, "ignore_eos": true});
    let want = text_of(&read_sse(c.post(format!("http://{addr}/v1/completions")).json(&good).send().await?).await);
    let streams: Vec<_> = (0..4)
        .map(|_| {
            let c = c.clone();
            let good = good.clone();
            tokio::spawn(
                async move { read_sse(c.post(format!("http://{addr}/v1/completions")).json(&good).send().await.expect("send")).await },
            )
        })
        .collect();
    let bad: Vec<_> = (0..100)
        .map(|i| {
            let c = c.clone();
            tokio::spawn(async move {
                let body = if i % 2 == 0 { json!({"prompt": [-1]}) } else { json!({"prompt": "x", "temperature": 9}) };
                c.post(format!("http://{addr}/v1/completions")).json(&body).send().await.expect("send").status().as_u16()
            })
        })
        .collect();
    for b in bad {
        assert_eq!(b.await?, 400);
    }
    for s in streams {
        assert_eq!(text_of(&s.await?), want);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_and_slow_bodies_are_cut_off() -> TestResult {
    let addr = start(|s| s.server.request_read_timeout_secs = 1).await;
    // A 200 KB header: refused (431) or the connection closed, never a crash.
    let mut sock = TcpStream::connect(addr)?;
    sock.set_read_timeout(Some(Duration::from_secs(5)))?;
    let big = "a".repeat(200_000);
    let _ = write!(sock, "GET /health HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n");
    let mut buf = vec![0u8; 1024];
    let n = sock.read(&mut buf).unwrap_or(0);
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(n == 0 || head.starts_with("HTTP/1.1 431"), "{head}");
    // A body that never completes: 408 after the read timeout.
    let mut sock = TcpStream::connect(addr)?;
    sock.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(sock, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"prompt\"")?;
    let n = sock.read(&mut buf)?;
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    let h = client().get(format!("http://{addr}/health")).send().await?;
    assert_eq!(h.status(), 200);
    Ok(())
}

/// The `mamba-serve` binary as a child process, with its address.
struct ServerProcess {
    child: Child,
    addr: SocketAddr,
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_binary(extra: &[&str]) -> ServerProcess {
    let model = fixtures_dir().join("mamba1-tiny");
    let device = test_device();
    let mut child = Command::new(serve_binary())
        .args(["serve", "--model", model.to_str().expect("utf-8 path"), "--port", "0", "--device", &device])
        .args(extra)
        .env("RUST_LOG", "warn")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("the binary starts");
    let mut stderr = child.stderr.take().expect("piped");
    let mut seen = String::new();
    let start = Instant::now();
    let addr = loop {
        let mut b = [0u8; 512];
        let n = stderr.read(&mut b).expect("stderr");
        assert!(n > 0, "the server exited early: {seen}");
        seen.push_str(&String::from_utf8_lossy(&b[..n]));
        if let Some(rest) = seen.split("listening on http://").nth(1) {
            if let Some(a) = rest.split_whitespace().next() {
                if rest.contains('\n') {
                    break a.parse().expect("address");
                }
            }
        }
        assert!(start.elapsed() < Duration::from_secs(30), "no listening line: {seen}");
    };
    // Keep draining stderr so the child never blocks on a full pipe.
    std::thread::spawn(move || {
        let mut sink = vec![0u8; 4096];
        while matches!(stderr.read(&mut sink), Ok(n) if n > 0) {}
    });
    ServerProcess { child, addr }
}

fn sigterm(child: &Child) {
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_lets_running_streams_finish_and_refuses_new_requests() -> TestResult {
    let mut srv = spawn_binary(&[]);
    let addr = srv.addr;
    let c = client();
    let body = json!({"prompt": "The", "max_tokens": 4000, "temperature": 0, "stream": true, "ignore_eos": true});
    let mut streams = vec![];
    for _ in 0..3 {
        let res = c.post(format!("http://{addr}/v1/completions")).json(&body).send().await?;
        assert_eq!(res.status(), 200);
        let mut s = res.bytes_stream();
        let first = s.next().await.expect("first chunk")?;
        streams.push((first, s));
    }
    sigterm(&srv.child);
    // New work is refused while the streams drain.
    let mut refused = false;
    for _ in 0..50 {
        let r = c.post(format!("http://{addr}/v1/completions")).json(&json!({"prompt": "x", "max_tokens": 2})).send().await;
        if let Ok(r) = r {
            if r.status() == 503 {
                assert!(r.headers().contains_key("retry-after"));
                let ready = c.get(format!("http://{addr}/ready")).send().await?;
                assert_eq!(ready.status(), 503);
                refused = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused, "new requests were not refused during the drain");
    for (first, mut s) in streams {
        let mut body = first.to_vec();
        while let Some(chunk) = s.next().await {
            body.extend_from_slice(&chunk?);
        }
        let (_, finish) = text_of(&crate::http::sse_data(&body));
        assert_eq!(finish.as_deref(), Some("length"), "the stream ran to its end");
    }
    let status = tokio::task::spawn_blocking(move || srv.child.wait()).await??;
    assert!(status.success(), "exit status {status}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_drain_deadline_cuts_streams_with_an_error_event() -> TestResult {
    // A one-second drain deadline, set through a config file.
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "[server]\ndrain_timeout_secs = 1\n[engine]\nmax_total_tokens = 2000000\n")?;
    let mut srv = spawn_binary(&["--config", cfg.to_str().expect("utf-8")]);
    let addr2 = srv.addr;
    let c = client();
    // A stream far longer than the deadline.
    let body = json!({"prompt": "The", "max_tokens": 1_000_000, "temperature": 0, "stream": true, "ignore_eos": true});
    let res = c.post(format!("http://{addr2}/v1/completions")).json(&body).send().await?;
    let mut s = res.bytes_stream();
    let mut all = s.next().await.expect("first")?.to_vec();
    sigterm(&srv.child);
    while let Some(chunk) = s.next().await {
        all.extend_from_slice(&chunk?);
    }
    let events = crate::http::sse_data(&all);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let err: Value = serde_json::from_str(&events[events.len() - 2])?;
    assert_eq!(err["error"]["code"], "draining", "{err}");
    let status = tokio::task::spawn_blocking(move || srv.child.wait()).await??;
    assert!(status.success(), "exit status {status}");
    Ok(())
}

/// The official `openai` Python package against the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_python_client_works() -> TestResult {
    let addr = start(|_| {}).await;
    let python = std::env::var("MAMBA_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.py");
    let out = tokio::process::Command::new(&python).arg(&script).arg(format!("http://{addr}/v1")).arg("mamba1-tiny").output().await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the openai client test failed (install the client with `pip install -r scripts/requirements-test.txt`, or run scripts/test.sh):\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("openai client: all checks passed"), "{stdout}");
    Ok(())
}

/// `mamba-serve generate --json` gives the reference's greedy tokens, and the
/// server gives the same text for the same request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_generate_command_matches_the_reference_and_the_server() -> TestResult {
    let dir = fixtures_dir().join("mamba1-tiny");
    let r = reference(&dir);
    let p = &r.prompts[2];
    let out = tokio::process::Command::new(serve_binary())
        .args([
            "generate",
            "--model",
            dir.to_str().expect("utf-8"),
            "--prompt",
            &p.text,
            "--max-tokens",
            "24",
            "--ignore-eos",
            "--json",
            "--device",
            &test_device(),
        ])
        .env("RUST_LOG", "warn")
        .output()
        .await?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout)?;
    let last = stdout.lines().last().expect("a JSON line");
    let v: Value = serde_json::from_str(last)?;
    assert_eq!(v["prompt_ids"], json!(p.ids));
    assert_eq!(v["generated_ids"], json!(p.greedy[..24]));
    assert!(v["timings"]["decode_s"].as_f64().is_some());
    let text = v["text"].as_str().expect("text");
    assert!(stdout.starts_with(text), "the text was streamed before the JSON line");
    let addr = start(|_| {}).await;
    let body = json!({"prompt": p.text, "max_tokens": 24, "temperature": 0, "ignore_eos": true});
    let server: Value = client().post(format!("http://{addr}/v1/completions")).json(&body).send().await?.json().await?;
    assert_eq!(server["choices"][0]["text"].as_str(), Some(text));
    Ok(())
}
