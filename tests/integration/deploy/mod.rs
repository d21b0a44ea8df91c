//! The deployment, for real: nginx with the repo's `docker/nginx.conf` in
//! front of three replicas of the `mamba-serve` binary (CPU, tiny model).
//! Requests spread over the replicas and streams pass through token by
//! token; a replica killed mid-run costs no non-streamed request and cuts
//! only its own streams; a replica drained with SIGTERM finishes its streams
//! while nginx moves new work elsewhere; saturated replicas answer 429 with
//! Retry-After through the proxy, and that takes no replica out of rotation.
//!
//! nginx must be installed (Debian: `nginx-light`); `MAMBA_TEST_NGINX` may
//! name the binary. Without it these tests fail: they never skip.

mod harness;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::common::*;
use harness::{Cluster, HANG, Nginx, lockstep_upstream, sample};

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

fn replica_of(res: &reqwest::Response) -> String {
    res.headers().get("x-replica").and_then(|v| v.to_str().ok()).unwrap_or("").to_string()
}

/// A greedy request that always generates exactly `max_tokens` tokens.
fn body(prompt: &str, max_tokens: usize, stream: bool) -> Value {
    json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true, "stream": stream})
}

/// A non-streamed completion: (status, replica, text or error JSON).
async fn complete(c: &reqwest::Client, url: &str, body: &Value) -> (u16, String, Value) {
    let send = async {
        let res = c.post(url).json(body).send().await.expect("the request gets an answer");
        let (status, replica) = (res.status().as_u16(), replica_of(&res));
        let bytes = res.bytes().await.expect("a whole body");
        // nginx's own errors are HTML: keep them as a string for the message.
        let v = serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        (status, replica, v)
    };
    tokio::time::timeout(HANG, send).await.expect("a non-streamed request hung")
}

fn text(v: &Value) -> String {
    v["choices"][0]["text"].as_str().unwrap_or_else(|| panic!("no completion text in {v}")).to_string()
}

/// What a client saw of one stream.
struct Streamed {
    replica: String,
    /// The data payloads, in order (`[DONE]` included).
    events: Vec<String>,
    /// The transport error that ended the stream, if any.
    error: Option<String>,
}

impl Streamed {
    fn done(&self) -> bool {
        self.events.last().map(String::as_str) == Some("[DONE]")
    }

    /// Asserts a complete, error-free stream of `length` finish.
    fn assert_complete(&self) {
        assert!(self.error.is_none() && self.done(), "stream on {} ended early: {:?}", self.replica, self.error);
        let last: Value = serde_json::from_str(&self.events[self.events.len() - 2]).expect("a JSON chunk");
        assert!(last.get("error").is_none(), "error event on {}: {last}", self.replica);
        assert_eq!(last["choices"][0]["finish_reason"], "length", "stream on {}", self.replica);
    }
}

/// The data payloads of SSE events (comments such as keep-alives dropped).
fn sse_data(body: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(body)
        .split("\n\n")
        .flat_map(|e| e.lines().filter_map(|l| l.strip_prefix("data: ")).map(str::to_string).collect::<Vec<_>>())
        .collect()
}

/// Sends a streamed request and waits for its response head (status 200).
async fn open_stream(c: &reqwest::Client, url: &str, body: &Value) -> reqwest::Response {
    let res = tokio::time::timeout(HANG, c.post(url).json(body).send()).await.expect("stream head hung").expect("stream head");
    assert_eq!(res.status(), 200, "stream refused by {}", replica_of(&res));
    res
}

/// Reads a stream to its end (or its transport error), within [`HANG`].
async fn finish_stream(res: reqwest::Response) -> Streamed {
    let replica = replica_of(&res);
    let mut body = res.bytes_stream();
    let mut buf = vec![];
    let mut error = None;
    let read = async {
        while let Some(chunk) = body.next().await {
            match chunk {
                Ok(b) => buf.extend_from_slice(&b),
                Err(e) => {
                    error = Some(e.to_string());
                    break;
                }
            }
        }
    };
    tokio::time::timeout(HANG, read).await.unwrap_or_else(|_| panic!("stream on {replica} hung"));
    Streamed { replica, events: sse_data(&buf), error }
}

/// Opens three streams one after another: least_conn gives each to a
/// replica with the fewest running streams, so they land one per replica.
async fn streams_one_per_replica(cl: &Cluster, c: &reqwest::Client, max_tokens: usize) -> Vec<reqwest::Response> {
    let mut out = vec![];
    for i in 0..3 {
        out.push(open_stream(c, &cl.completions(), &body(&format!("stream {i}"), max_tokens, true)).await);
    }
    let mut names: Vec<String> = out.iter().map(replica_of).collect();
    names.sort();
    assert_eq!(names, ["replica-0", "replica-1", "replica-2"], "least_conn spread three streams:\n{}", cl.nginx.access_log());
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_spread_over_replicas_and_streams_pass_token_by_token() -> TestResult {
    let cl = Cluster::start(&[]);
    let c = client();
    let url = cl.completions();
    let want = text(&complete(&c, &format!("http://{}/v1/completions", cl.replicas[0].addr), &body("Hello", 40, false)).await.2);

    // Concurrent requests land on every replica, and all agree.
    let tasks: Vec<_> = (0..12)
        .map(|_| {
            let (c, url) = (c.clone(), url.clone());
            tokio::spawn(async move { complete(&c, &url, &body("Hello", 40, false)).await })
        })
        .collect();
    let mut served: BTreeMap<String, usize> = BTreeMap::new();
    for t in tasks {
        let (status, replica, v) = t.await?;
        assert_eq!(status, 200, "{v}");
        assert_eq!(text(&v), want);
        *served.entry(replica).or_default() += 1;
    }
    assert_eq!(served.keys().collect::<Vec<_>>(), ["replica-0", "replica-1", "replica-2"], "{served:?}");

    // nginx forwards the client's request id, and the replica echoes it.
    let res = c.post(&url).header("x-request-id", "deploy-test-1").json(&body("Hi", 2, false)).send().await?;
    assert_eq!(res.headers().get("x-request-id").and_then(|v| v.to_str().ok()), Some("deploy-test-1"));

    // A long stream: its first token reaches the client through nginx while
    // the replica is still generating the rest.
    let started = Instant::now();
    let res = open_stream(&c, &url, &body("Once upon a time", 8000, true)).await;
    let replica = cl.replica(&replica_of(&res));
    let mut chunks = res.bytes_stream();
    let mut buf = vec![];
    while !String::from_utf8_lossy(&buf).contains("data: {") {
        let chunk = tokio::time::timeout(HANG, chunks.next()).await?.expect("a first chunk")?;
        buf.extend_from_slice(&chunk);
    }
    let first = started.elapsed();
    let running = sample(&replica.metrics().await, "mamba_running_sequences");
    assert_eq!(running, 1.0, "the stream was still generating on {} when its first token arrived", replica.name);
    let mut reads = 1;
    while let Some(chunk) = tokio::time::timeout(HANG, chunks.next()).await? {
        buf.extend_from_slice(&chunk?);
        reads += 1;
    }
    let total = started.elapsed();
    let events = sse_data(&buf);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert!(events.len() > 1000, "{} events", events.len());
    assert!(first * 4 < total, "first token after {first:?} of {total:?}");
    assert!(reads >= 10, "the stream arrived in {reads} pieces");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_passes_each_event_and_keep_alive_on_at_once() -> TestResult {
    let events: Vec<String> = [": keep-alive\n\n".to_string()]
        .into_iter()
        .chain((0..5).map(|i| format!("data: {{\"token\": {i}}}\n\n")))
        .chain(["data: [DONE]\n\n".to_string()])
        .collect();
    let (tx, rx) = std::sync::mpsc::channel();
    let upstream = lockstep_upstream(events.clone(), rx);
    let nginx = Nginx::start_for(&[upstream]);
    // As a browser would: compression, if nginx applied it here, would hold
    // events back too.
    let res =
        client().post(format!("{}/v1/completions", nginx.url)).header("accept-encoding", "gzip").json(&body("x", 5, true)).send().await?;
    assert_eq!(res.status(), 200);
    let mut chunks = res.bytes_stream();
    let mut got = String::new();
    for e in &events {
        while !got.ends_with(e.as_str()) {
            let next = tokio::time::timeout(Duration::from_secs(5), chunks.next()).await;
            let chunk = next.unwrap_or_else(|_| panic!("nginx held back {e:?}; the client has {got:?}")).expect("more")?;
            got.push_str(&String::from_utf8_lossy(&chunk));
        }
        tx.send(())?;
    }
    assert_eq!(got, events.concat());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_replica_costs_no_request_and_cuts_only_its_streams() -> TestResult {
    let cl = Cluster::start(&[]);
    let c = client();
    let url = cl.completions();
    let prompt = "The quick brown fox";
    let want = text(&complete(&c, &format!("http://{}/v1/completions", cl.replicas[0].addr), &body(prompt, 300, false)).await.2);
    let streams = streams_one_per_replica(&cl, &c, 12_000).await;
    let victim = cl.replica(&replica_of(&streams[0]));
    let readers: Vec<_> = streams.into_iter().map(|s| tokio::spawn(finish_stream(s))).collect();

    // Six clients, four non-streamed requests each.
    let workers: Vec<_> = (0..6)
        .map(|_| {
            let (c, url) = (c.clone(), url.clone());
            tokio::spawn(async move {
                let mut out = vec![];
                for _ in 0..4 {
                    out.push(complete(&c, &url, &body(prompt, 300, false)).await);
                }
                out
            })
        })
        .collect();
    // Kill the victim while it runs a non-streamed request beside its stream.
    let deadline = Instant::now() + HANG;
    while sample(&victim.metrics().await, "mamba_running_sequences") < 2.0 {
        assert!(Instant::now() < deadline, "no non-streamed request reached {}", victim.name);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    victim.signal(libc::SIGKILL);

    for w in workers {
        for (status, replica, v) in w.await? {
            assert_eq!(status, 200, "from {replica}: {v}\n{}", cl.nginx.access_log());
            assert_eq!(text(&v), want, "from {replica}");
        }
    }
    let log = cl.nginx.access_log();
    let victim_addr = victim.addr.to_string();
    assert!(
        log.lines().any(|l| l.contains(&format!("upstream={victim_addr}, ")) && l.contains(" 200 ")),
        "no request was retried away from the killed replica:\n{log}"
    );
    for r in readers {
        let s = r.await?;
        if s.replica == victim.name {
            assert!(!s.done(), "the killed replica's stream ended with [DONE]");
        } else {
            s.assert_complete();
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_draining_replica_finishes_its_streams_and_gets_no_new_work() -> TestResult {
    let mut cl = Cluster::start(&[]);
    let c = client();
    let url = cl.completions();
    let streams = streams_one_per_replica(&cl, &c, 12_000).await;
    let victim_name = replica_of(&streams[0]);
    let readers: Vec<_> = streams.into_iter().map(|s| tokio::spawn(finish_stream(s))).collect();
    let victim = cl.replica(&victim_name);
    victim.signal(libc::SIGTERM);
    // Wait until the victim refuses new work (its /ready turns 503).
    let ready = format!("http://{}/ready", victim.addr);
    let deadline = Instant::now() + HANG;
    while c.get(&ready).send().await?.status() != 503 {
        assert!(Instant::now() < deadline, "{victim_name} never started draining");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // New work during the drain: every request answered, none by the victim.
    for i in 0..9 {
        let (status, replica, v) = complete(&c, &url, &body(&format!("during the drain {i}"), 8, false)).await;
        assert_eq!(status, 200, "{v}\n{}", cl.nginx.access_log());
        assert_ne!(replica, victim_name);
        if i % 3 == 0 {
            let s = finish_stream(open_stream(&c, &url, &body("streamed during the drain", 8, true)).await).await;
            assert_ne!(s.replica, victim_name);
            s.assert_complete();
        }
    }
    // nginx did offer it work, got a 503, and then left it alone.
    let refused = sample(&victim.metrics().await, "mamba_requests_total{endpoint=\"/v1/completions\",status=\"503\"}");
    assert!(refused >= 1.0, "nginx never tried the draining replica, so this proved nothing\n{}", cl.nginx.access_log());
    assert!(refused <= 2.0, "nginx kept sending the draining replica work ({refused} refusals)");

    // Its stream, and everyone else's, ran to the end.
    for r in readers {
        r.await?.assert_complete();
    }
    let victim = cl.replicas.iter_mut().find(|r| r.name == victim_name).expect("victim");
    let mut child_exit = None;
    let deadline = Instant::now() + HANG;
    while child_exit.is_none() {
        child_exit = victim.child.try_wait()?;
        assert!(Instant::now() < deadline, "{victim_name} did not exit after its drain");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(child_exit.is_some_and(|s| s.success()), "{victim_name} exited with {child_exit:?}");
    // Gone for good: its port refuses connections, and nginx still answers.
    for _ in 0..4 {
        let (status, replica, v) = complete(&c, &url, &body("after the drain", 4, false)).await;
        assert_eq!(status, 200, "{v}");
        assert_ne!(replica, victim_name);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn saturated_replicas_answer_429_through_nginx_and_stay_in_rotation() -> TestResult {
    // One slot and one queue place each: six requests fit in all.
    let cl = Cluster::start(&[("MAMBA_SERVE_ENGINE_SLOTS", "1"), ("MAMBA_SERVE_ENGINE_MAX_QUEUE", "1")]);
    let c = client();
    let url = cl.completions();
    let tasks: Vec<_> = (0..18)
        .map(|i| {
            let (c, url) = (c.clone(), url.clone());
            tokio::spawn(async move {
                let send = c.post(&url).json(&body(&format!("burst {i}"), 3000, true)).send();
                let res = tokio::time::timeout(HANG, send).await.expect("a burst request hung").expect("an answer");
                match res.status().as_u16() {
                    200 => (200, Some(finish_stream(res).await)),
                    429 => {
                        let retry = res.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_owned);
                        assert!(retry.is_some_and(|r| r.parse::<u64>().is_ok()), "429 without Retry-After");
                        let v: Value = res.json().await.expect("JSON error");
                        assert_eq!(v["error"]["code"], "server_overloaded", "{v}");
                        (429, None)
                    }
                    other => panic!("status {other} from {}", replica_of(&res)),
                }
            })
        })
        .collect();
    let (mut ok, mut refused) = (0, 0);
    for t in tasks {
        match t.await? {
            (200, Some(s)) => {
                s.assert_complete();
                ok += 1;
            }
            _ => refused += 1,
        }
    }
    assert!(refused >= 1, "the burst never filled the replicas");
    assert!(ok >= 3, "only {ok} requests were served");

    // No replica was marked failed for its 429s: all three still get work.
    for r in &cl.replicas {
        let deadline = Instant::now() + HANG;
        while sample(&r.metrics().await, "mamba_slots_used") > 0.0 {
            assert!(Instant::now() < deadline, "{} never went idle", r.name);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let mut served = BTreeMap::new();
    for i in 0..6 {
        let (status, replica, v) = complete(&c, &url, &body(&format!("after {i}"), 4, false)).await;
        assert_eq!(status, 200, "{v}\n{}", cl.nginx.access_log());
        *served.entry(replica).or_insert(0) += 1;
    }
    assert_eq!(served.len(), 3, "a replica left the rotation after its 429s: {served:?}");
    Ok(())
}
