//! The HTTP API driven through the router, without a socket: every row of
//! the bad-input table, each sent plain and with `stream: true`, the error
//! shape, auth, and the well-formed answers of every route.

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

use mamba_serve::config::Settings;

use crate::common::*;

/// Settings for a small CPU server on a fixture model.
pub fn settings(edit: impl FnOnce(&mut Settings)) -> Settings {
    let mut s = Settings::load(None, &[], &[]).expect("defaults load");
    s.model.path = fixtures_dir().join("mamba1-tiny").display().to_string();
    // The GPU run of these tests sets MAMBA_TEST_DEVICE=cuda.
    s.model.device = test_device();
    s.engine.slots = 4;
    s.engine.max_queue = 16;
    s.engine.max_prompt_tokens = 256;
    s.engine.max_total_tokens = 512;
    s.engine.max_prompt_chars = 4096;
    s.engine.max_batch_prompts = 4;
    edit(&mut s);
    s
}

pub fn server(edit: impl FnOnce(&mut Settings)) -> mamba_serve::Server {
    mamba_serve::build(&settings(edit)).expect("the fixture server builds")
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: axum::http::HeaderMap,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

pub async fn send(router: &axum::Router, req: Request<Body>) -> Reply {
    let res = router.clone().oneshot(req).await.expect("the router answers");
    let status = res.status();
    let headers = res.headers().clone();
    let body = res.into_body().collect().await.expect("body").to_bytes().to_vec();
    Reply { status, headers, body }
}

pub fn post(path: &str, body: impl Into<Body>) -> Request<Body> {
    Request::post(path).header(header::CONTENT_TYPE, "application/json").body(body.into()).expect("request")
}

async fn post_json(router: &axum::Router, path: &str, body: &Value) -> Reply {
    send(router, post(path, body.to_string())).await
}

/// Checks the OpenAI error shape and returns (message, type, param, code).
fn error_of(r: &Reply) -> (String, String, Option<String>, Option<String>) {
    assert_eq!(r.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()), Some("application/json"), "error content type");
    let v = r.json();
    let obj = v.as_object().expect("object");
    assert_eq!(obj.len(), 1, "only `error` at the top level: {v}");
    let e = v["error"].as_object().expect("error object");
    for k in ["message", "type", "param", "code"] {
        assert!(e.contains_key(k), "error lacks `{k}`: {v}");
    }
    let s = |k: &str| e[k].as_str().map(str::to_owned);
    (s("message").expect("message is a string"), s("type").expect("type is a string"), s("param"), s("code"))
}

/// A bad body, sent plain and streamed: same status, same error, and the
/// server still healthy.
async fn refused(router: &axum::Router, body: &str, status: StatusCode, param: Option<&str>) {
    let mut bodies = vec![body.to_string()];
    // The streamed variant, made by text so malformed bodies stay malformed.
    if let Some(rest) = body.trim_start().strip_prefix('{') {
        if !body.contains("\"stream\"") {
            bodies.push(format!("{{\"stream\": true, {rest}"));
        }
    }
    for b in bodies {
        let r = send(router, post("/v1/completions", b.clone())).await;
        assert_eq!(r.status, status, "body {b}: {}", String::from_utf8_lossy(&r.body));
        let (_, _, p, _) = error_of(&r);
        if let Some(want) = param {
            assert_eq!(p.as_deref(), Some(want), "param for {b}");
        }
    }
    let h = send(router, Request::get("/health").body(Body::empty()).expect("req")).await;
    assert_eq!(h.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bad_input_table() {
    let srv = server(|s| s.server.max_body_bytes = 3 << 20);
    let r = &srv.router;
    let bad = StatusCode::BAD_REQUEST;
    // 1-4, 6-7: malformed JSON.
    refused(r, r#"{"prompt":"hi","#, bad, None).await;
    refused(r, "", bad, None).await;
    for body in
        ["[1, 2]", r#"{"prompt": "a"} x"#, r#"{"prompt": NaN}"#, r#"{"prompt": "a", "max_tokens": 1e400}"#, r#"{"prompt": "\ud800"}"#]
    {
        refused(r, body, bad, None).await;
    }
    let invalid_utf8 = [&b"{\"prompt\": \""[..], &[0xff, 0xfe], &b"\"}"[..]].concat();
    let res = send(r, post("/v1/completions", invalid_utf8)).await;
    assert_eq!(res.status, bad);
    refused(r, r#"{"prompt": "a", "prompt": "b"}"#, bad, Some("prompt")).await;
    // 5: NUL inside the prompt is valid JSON and must not break anything.
    let ok = post_json(r, "/v1/completions", &json!({"prompt": "a\u{0}b", "max_tokens": 2})).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", String::from_utf8_lossy(&ok.body));
    // 10-13: prompts.
    refused(r, r#"{"max_tokens": 3}"#, bad, Some("prompt")).await;
    refused(r, r#"{"prompt": null}"#, bad, Some("prompt")).await;
    refused(r, r#"{"prompt": ""}"#, bad, Some("prompt")).await;
    refused(r, r#"{"prompt": []}"#, bad, Some("prompt")).await;
    refused(r, r#"{"prompt": [[]]}"#, bad, Some("prompt")).await;
    for ids in ["[-1]", "[500]", "[4294967296]", "[1.5]", r#"["7", 1]"#, "[1, \"7\"]"] {
        refused(r, &format!(r#"{{"prompt": {ids}}}"#), bad, Some("prompt")).await;
    }
    // 14: too many prompts.
    refused(r, r#"{"prompt": ["a", "b", "c", "d", "e"]}"#, bad, Some("prompt")).await;
    // 15-16: too long, by tokens and by characters (refused before tokenizing).
    let many_tokens = "word ".repeat(300);
    refused(r, &json!({"prompt": many_tokens}).to_string(), bad, Some("prompt")).await;
    let huge = "x".repeat(1_900_000);
    let res = post_json(r, "/v1/completions", &json!({"prompt": huge})).await;
    assert_eq!(res.status, bad);
    assert_eq!(error_of(&res).3.as_deref(), Some("context_length_exceeded"));
    // 17-18: max_tokens.
    for m in ["0", "-1", "1099511627776", "1.5", "\"10\""] {
        refused(r, &format!(r#"{{"prompt": "hi", "max_tokens": {m}}}"#), bad, Some("max_tokens")).await;
    }
    let res = post_json(r, "/v1/completions", &json!({"prompt": "hi", "max_tokens": 511})).await;
    assert_eq!(error_of(&res).3.as_deref(), Some("context_length_exceeded"));
    // 19-23: sampling ranges.
    for (field, values) in [
        ("temperature", vec!["-0.1", "2.5", "\"hot\""]),
        ("top_p", vec!["0", "-0.1", "1.1"]),
        ("top_k", vec!["-2", "1.5"]),
        ("presence_penalty", vec!["-2.5", "3"]),
        ("frequency_penalty", vec!["2.01", "-9"]),
        ("min_p", vec!["1.5"]),
        ("repetition_penalty", vec!["0", "-1"]),
    ] {
        for v in values {
            refused(r, &format!(r#"{{"prompt": "hi", "{field}": {v}}}"#), bad, Some(field)).await;
        }
    }
    // 24: stop.
    let long_stop = "s".repeat(1 << 20);
    for stop in [json!(["a", "b", "c", "d", "e"]), json!([""]), json!(long_stop), json!(5), json!([1])] {
        refused(r, &json!({"prompt": "hi", "stop": stop}).to_string(), bad, Some("stop")).await;
    }
    // 25-26: n, best_of, logprobs.
    refused(r, r#"{"prompt": "hi", "n": 0}"#, bad, Some("n")).await;
    refused(r, r#"{"prompt": "hi", "n": 1000}"#, bad, Some("n")).await;
    refused(r, r#"{"prompt": "hi", "best_of": 30}"#, bad, Some("best_of")).await;
    refused(r, r#"{"prompt": "hi", "logprobs": 6}"#, bad, Some("logprobs")).await;
    // 27: logit_bias.
    for lb in [json!({"abc": 1}), json!({"500": 1}), json!({"5": 1e9})] {
        refused(r, &json!({"prompt": "hi", "logit_bias": lb}).to_string(), bad, Some("logit_bias")).await;
    }
    // 28-29, 31: types, unknown fields, seeds.
    refused(r, r#"{"prompt": "hi", "stream": "yes"}"#, bad, Some("stream")).await;
    refused(r, r#"{"prompt": "hi", "foo": 1}"#, bad, Some("foo")).await;
    refused(r, r#"{"prompt": "hi", "seed": -1}"#, bad, Some("seed")).await;
    refused(r, r#"{"prompt": "hi", "seed": 1180591620717411303424}"#, bad, Some("seed")).await;
    refused(r, r#"{"prompt": "hi", "stop_token_ids": [9999]}"#, bad, Some("stop_token_ids")).await;
    refused(r, r#"{"prompt": "hi", "suffix": "x"}"#, bad, Some("suffix")).await;
    // 30: unknown model.
    let res = post_json(r, "/v1/completions", &json!({"model": "gpt-4", "prompt": "hi"})).await;
    assert_eq!(res.status, StatusCode::NOT_FOUND);
    assert_eq!(error_of(&res).3.as_deref(), Some("model_not_found"));
    // 8: content type.
    for ct in [None, Some("text/plain")] {
        let mut b = Request::post("/v1/completions");
        if let Some(ct) = ct {
            b = b.header(header::CONTENT_TYPE, ct);
        }
        let res = send(r, b.body(Body::from(r#"{"prompt": "hi"}"#)).expect("req")).await;
        assert_eq!(res.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        error_of(&res);
    }
    // 9: body size: over the limit 413; a big body under a raised limit works.
    let over = json!({"prompt": "hi", "user": "u".repeat(3 << 20)}).to_string();
    let res = send(r, post("/v1/completions", over)).await;
    assert_eq!(res.status, StatusCode::PAYLOAD_TOO_LARGE);
    error_of(&res);
    let under = json!({"prompt": "hi", "max_tokens": 2, "user": "u".repeat(2_500_000)}).to_string();
    assert_eq!(send(r, post("/v1/completions", under)).await.status, StatusCode::OK);
    // 33: wrong method.
    let res = send(r, Request::get("/v1/completions").body(Body::empty()).expect("req")).await;
    assert_eq!(res.status, StatusCode::METHOD_NOT_ALLOWED);
    error_of(&res);
    let res = send(r, Request::get("/nope").body(Body::empty()).expect("req")).await;
    assert_eq!(res.status, StatusCode::NOT_FOUND);
    error_of(&res);
    // 20: temperature 0 is greedy and deterministic.
    let a = post_json(r, "/v1/completions", &json!({"prompt": "The", "max_tokens": 8, "temperature": 0})).await.json();
    let b = post_json(r, "/v1/completions", &json!({"prompt": "The", "max_tokens": 8, "temperature": 0})).await.json();
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);
    let res = post_json(r, "/v1/completions", &json!({"prompt": "hi", "top_p": 1.0, "max_tokens": 1})).await;
    assert_eq!(res.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_guard_inference_routes_before_the_body_is_read() {
    let srv = server(|s| s.server.api_keys = vec!["Sekret-1".into()]);
    let r = &srv.router;
    for auth in [None, Some("Bearer wrong"), Some("Bearer sekret-1"), Some("Sekret-1"), Some("Bearer Sekret-1x")] {
        let mut b = Request::post("/v1/completions").header(header::CONTENT_TYPE, "application/json");
        if let Some(a) = auth {
            b = b.header(header::AUTHORIZATION, a);
        }
        // The body is malformed: a 401 (not 400) shows auth ran first.
        let res = send(r, b.body(Body::from("{not json")).expect("req")).await;
        assert_eq!(res.status, StatusCode::UNAUTHORIZED, "{auth:?}");
        assert_eq!(error_of(&res).3.as_deref(), Some("invalid_api_key"));
    }
    let ok = Request::post("/v1/completions")
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::AUTHORIZATION, "Bearer Sekret-1")
        .body(Body::from(r#"{"prompt": "hi", "max_tokens": 2}"#))
        .expect("req");
    assert_eq!(send(r, ok).await.status, StatusCode::OK);
    for path in ["/health", "/ready", "/metrics"] {
        assert_eq!(send(r, Request::get(path).body(Body::empty()).expect("req")).await.status, StatusCode::OK, "{path}");
    }
    assert_eq!(send(r, Request::get("/v1/models").body(Body::empty()).expect("req")).await.status, StatusCode::UNAUTHORIZED);
}

/// Splits an SSE body into its `data:` payloads.
pub fn sse_data(body: &[u8]) -> Vec<String> {
    let text = String::from_utf8(body.to_vec()).expect("SSE is UTF-8");
    text.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .filter_map(|e| {
            let lines: Vec<&str> = e.lines().filter(|l| !l.starts_with(':')).collect();
            if lines.is_empty() {
                return None;
            }
            assert_eq!(lines.len(), 1, "one data line per event: {e:?}");
            Some(lines[0].strip_prefix("data: ").expect("data events only").to_string())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_streamed_and_not_agree_with_offline_generation() -> TestResult {
    let srv = server(|_| {});
    let r = &srv.router;
    let dir = fixtures_dir().join("mamba1-tiny");
    let reference = reference(&dir);
    let p = &reference.prompts[1];
    let tok = mamba_serve::tokenizer::Tokenizer::from_dir(&dir)?;
    let want = tok.decode(&p.greedy[..20], true)?;
    let body = json!({"prompt": p.text, "max_tokens": 20, "temperature": 0, "ignore_eos": true});
    let plain = post_json(r, "/v1/completions", &body).await;
    assert_eq!(plain.status, StatusCode::OK);
    let v = plain.json();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], want);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 20);
    assert_eq!(v["usage"]["prompt_tokens"], p.ids.len());
    assert!(plain.headers.contains_key("x-request-id") && plain.headers.contains_key("x-replica"));

    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    sbody["stream_options"] = json!({"include_usage": true});
    let streamed = post_json(r, "/v1/completions", &sbody).await;
    assert_eq!(streamed.status, StatusCode::OK);
    assert_eq!(streamed.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()), Some("text/event-stream"));
    let events = sse_data(&streamed.body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).expect("JSON chunk")).collect();
    let text: String = chunks.iter().filter_map(|c| c["choices"].get(0).and_then(|ch| ch["text"].as_str())).collect();
    assert_eq!(text, want);
    let ids: std::collections::HashSet<&str> = chunks.iter().map(|c| c["id"].as_str().expect("id")).collect();
    assert_eq!(ids.len(), 1, "one id per stream");
    let usage = chunks.last().expect("usage chunk");
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 20);
    let finish: Vec<&Value> = chunks.iter().filter_map(|c| c["choices"].get(0)).filter(|c| !c["finish_reason"].is_null()).collect();
    assert_eq!(finish.len(), 1);
    assert_eq!(finish[0]["finish_reason"], "length");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completion_features_batch_n_echo_stop_logprobs_and_ids() -> TestResult {
    let srv = server(|_| {});
    let r = &srv.router;
    let dir = fixtures_dir().join("mamba1-tiny");
    let reference = reference(&dir);
    let tok = mamba_serve::tokenizer::Tokenizer::from_dir(&dir)?;
    let (p0, p1) = (&reference.prompts[1], &reference.prompts[2]);
    // A batch of prompts with n = 2, greedy: choices p*n + c, equal within a prompt.
    let v = post_json(
        r,
        "/v1/completions",
        &json!({"prompt": [p0.text, p1.text], "n": 2, "max_tokens": 6, "temperature": 0, "ignore_eos": true}),
    )
    .await
    .json();
    let texts: Vec<&str> = v["choices"].as_array().expect("choices").iter().map(|c| c["text"].as_str().expect("text")).collect();
    assert_eq!(texts.len(), 4);
    assert_eq!(texts[0], texts[1]);
    assert_eq!(texts[0], tok.decode(&p0.greedy[..6], true)?);
    assert_eq!(texts[2], tok.decode(&p1.greedy[..6], true)?);
    assert_eq!(v["usage"]["prompt_tokens"], p0.ids.len() + p1.ids.len());
    assert_eq!(v["usage"]["completion_tokens"], 24);
    // `max_completion_tokens` is an alias of `max_tokens`.
    let alias =
        post_json(r, "/v1/completions", &json!({"prompt": p0.text, "max_completion_tokens": 6, "temperature": 0, "ignore_eos": true}))
            .await
            .json();
    assert_eq!(alias["choices"][0]["text"].as_str(), Some(texts[0]));
    assert_eq!(alias["usage"]["completion_tokens"], 6);
    // Token-id prompts give the same as text.
    let v2 =
        post_json(r, "/v1/completions", &json!({"prompt": p0.ids, "max_tokens": 6, "temperature": 0, "ignore_eos": true})).await.json();
    assert_eq!(v2["choices"][0]["text"], texts[0]);
    // Echo prepends the prompt.
    let v3 =
        post_json(r, "/v1/completions", &json!({"prompt": p0.text, "max_tokens": 6, "temperature": 0, "echo": true, "ignore_eos": true}))
            .await
            .json();
    assert_eq!(v3["choices"][0]["text"].as_str().expect("text"), format!("{}{}", p0.text, texts[0]));
    // A stop string cuts the text before it and finishes with "stop".
    let full = tok.decode(&p0.greedy[..12], true)?;
    let cut = full.char_indices().nth(full.chars().count() / 2).map(|(i, _)| i).expect("mid");
    let stop: String = full[cut..].chars().take(2).collect();
    let before = &full[..full.find(&stop).expect("stop occurs")];
    for stream in [false, true] {
        let res = post_json(
            r,
            "/v1/completions",
            &json!({"prompt": p0.text, "max_tokens": 12, "temperature": 0, "stop": stop, "stream": stream, "ignore_eos": true}),
        )
        .await;
        let (text, finish) = if stream {
            let evs = sse_data(&res.body);
            let chunks: Vec<Value> = evs[..evs.len() - 1].iter().map(|e| serde_json::from_str(e).expect("json")).collect();
            let text: String = chunks.iter().filter_map(|c| c["choices"][0]["text"].as_str()).collect();
            let finish = chunks.iter().find_map(|c| c["choices"][0]["finish_reason"].as_str().map(str::to_owned)).expect("finish");
            (text, finish)
        } else {
            let v = res.json();
            (v["choices"][0]["text"].as_str().expect("text").to_string(), v["choices"][0]["finish_reason"].as_str().expect("f").to_string())
        };
        assert_eq!(text, before, "stream={stream}");
        assert_eq!(finish, "stop");
    }
    // Logprobs: one entry per token, alternatives sorted, the chosen one among them.
    let v =
        post_json(r, "/v1/completions", &json!({"prompt": p0.text, "max_tokens": 5, "temperature": 0, "logprobs": 3, "ignore_eos": true}))
            .await
            .json();
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().expect("tokens").len(), 5);
    for (i, top) in lp["top_logprobs"].as_array().expect("top").iter().enumerate() {
        let m = top.as_object().expect("map");
        assert!(!m.is_empty() && m.len() <= 3);
        let best = m.values().map(|x| x.as_f64().expect("f")).fold(f64::MIN, f64::max);
        let chosen = lp["token_logprobs"][i].as_f64().expect("lp");
        assert!((best - chosen).abs() < 1e-5, "greedy picks the most likely token");
        assert!(chosen <= 0.0);
    }
    // A seeded sampled request repeats.
    let body = json!({"prompt": p0.text, "max_tokens": 10, "temperature": 1.0, "seed": 11});
    let a = post_json(r, "/v1/completions", &body).await.json();
    let b = post_json(r, "/v1/completions", &body).await.json();
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_uses_the_template_and_refuses_without_one() -> TestResult {
    let srv = server(|_| {});
    let r = &srv.router;
    let reference: Value = serde_json::from_str(&std::fs::read_to_string(fixtures_dir().join("mamba1-tiny/reference.json"))?)?;
    let ex = &reference["chat_example"];
    // The rendered prompt is what transformers renders.
    let tokens = post_json(r, "/tokenize", &json!({"messages": ex["messages"]})).await.json();
    assert_eq!(tokens["tokens"], ex["ids"]);
    let body = json!({"messages": ex["messages"], "max_tokens": 8, "temperature": 0, "ignore_eos": true});
    let v = post_json(r, "/v1/chat/completions", &body).await.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    let text = v["choices"][0]["message"]["content"].as_str().expect("content").to_string();
    let ids: Vec<i64> = serde_json::from_value(ex["ids"].clone())?;
    let plain =
        post_json(r, "/v1/completions", &json!({"prompt": ids, "max_tokens": 8, "temperature": 0, "ignore_eos": true})).await.json();
    assert_eq!(plain["choices"][0]["text"].as_str(), Some(text.as_str()));
    assert_eq!(v["usage"]["prompt_tokens"], ex["ids"].as_array().expect("ids").len());
    // Streamed: role first, content deltas, a finish chunk, [DONE].
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    let res = post_json(r, "/v1/chat/completions", &sbody).await;
    let evs = sse_data(&res.body);
    assert_eq!(evs.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = evs[..evs.len() - 1].iter().map(|e| serde_json::from_str(e).expect("json")).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk"));
    let streamed: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(streamed, text);
    assert_eq!(chunks.last().expect("last")["choices"][0]["finish_reason"], "length");
    // Bad chat requests.
    let e = post_json(r, "/v1/chat/completions", &json!({"messages": []})).await;
    assert_eq!((e.status, error_of(&e).2.as_deref()), (StatusCode::BAD_REQUEST, Some("messages")));
    let e =
        post_json(r, "/v1/chat/completions", &json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}))
            .await;
    assert_eq!(e.status, StatusCode::BAD_REQUEST);
    let e = post_json(r, "/v1/chat/completions", &json!({"messages": [{"role": "user", "content": "hi"}], "tools": []})).await;
    assert_eq!((e.status, error_of(&e).2.as_deref()), (StatusCode::BAD_REQUEST, Some("tools")));

    // A model without a template: a clear 400.
    let other = server(|s| s.model.path = fixtures_dir().join("mamba1-variant").display().to_string());
    let e = post_json(&other.router, "/v1/chat/completions", &json!({"messages": [{"role": "user", "content": "hi"}]})).await;
    assert_eq!(e.status, StatusCode::BAD_REQUEST);
    assert!(error_of(&e).0.contains("no chat template"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_and_utility_routes() -> TestResult {
    let srv = server(|_| {});
    let r = &srv.router;
    let dir = fixtures_dir().join("mamba1-tiny");
    let reference = reference(&dir);
    let tok = mamba_serve::tokenizer::Tokenizer::from_dir(&dir)?;
    let p = &reference.prompts[1];
    let want = tok.decode(&p.greedy[..10], true)?;
    let v = post_json(r, "/generate", &json!({"inputs": p.text, "parameters": {"max_new_tokens": 10, "details": true}})).await.json();
    assert_eq!(v["generated_text"], want);
    assert_eq!(v["details"]["finish_reason"], "length");
    assert_eq!(v["details"]["generated_tokens"], 10);
    let ids: Vec<u64> = v["details"]["tokens"].as_array().expect("tokens").iter().map(|t| t["id"].as_u64().expect("id")).collect();
    assert_eq!(ids, p.greedy[..10].iter().map(|&x| x as u64).collect::<Vec<_>>());
    let res = post_json(r, "/generate_stream", &json!({"inputs": p.text, "parameters": {"max_new_tokens": 10}})).await;
    let evs: Vec<Value> = sse_data(&res.body).iter().map(|e| serde_json::from_str(e).expect("json")).collect();
    assert_eq!(evs.len(), 10, "one event per token");
    assert!(evs[..9].iter().all(|e| e["generated_text"].is_null()));
    assert_eq!(evs[9]["generated_text"], want);
    assert_eq!(evs[9]["details"]["finish_reason"], "length");
    let joined: String = evs.iter().map(|e| e["token"]["text"].as_str().expect("text")).collect();
    assert_eq!(joined, want);
    let e = post_json(r, "/generate", &json!({"inputs": "x", "parameters": {"watermark": true}})).await;
    assert_eq!(e.status, StatusCode::BAD_REQUEST);

    let t = post_json(r, "/tokenize", &json!({"prompt": p.text})).await.json();
    assert_eq!(t["tokens"], json!(p.ids));
    assert_eq!(t["count"], p.ids.len());
    let d = post_json(r, "/detokenize", &json!({"tokens": p.ids})).await.json();
    assert_eq!(d["prompt"], p.text);
    let e = post_json(r, "/detokenize", &json!({"tokens": [1, 99999]})).await;
    assert_eq!((e.status, error_of(&e).2.as_deref()), (StatusCode::BAD_REQUEST, Some("tokens")));

    let m = send(r, Request::get("/v1/models").body(Body::empty())?).await.json();
    assert_eq!(m["object"], "list");
    assert_eq!(m["data"][0]["id"], "mamba1-tiny");
    let metrics = String::from_utf8(send(r, Request::get("/metrics").body(Body::empty())?).await.body)?;
    for name in [
        "mamba_requests_total{",
        "mamba_slots_total 4",
        "mamba_slots_used ",
        "mamba_running_sequences ",
        "mamba_queue_depth",
        "mamba_state_bytes_per_slot ",
        "mamba_prompt_tokens_total ",
        "mamba_time_to_first_token_seconds_bucket",
        "mamba_inter_token_latency_seconds_count",
        "mamba_step_seconds_sum",
        "mamba_generated_tokens_total",
    ] {
        assert!(metrics.contains(name), "metrics lack {name}");
    }
    let ready = send(r, Request::get("/ready").body(Body::empty())?).await;
    assert_eq!(ready.status, StatusCode::OK);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_is_off_by_default_and_follows_the_setting() -> TestResult {
    let preflight = || {
        Request::builder()
            .method("OPTIONS")
            .uri("/v1/completions")
            .header(header::ORIGIN, "https://app.example")
            .header(header::ACCESS_CONTROL_REQUEST_METHOD, "POST")
            .body(Body::empty())
    };
    let off = server(|_| {});
    let res = send(&off.router, preflight()?).await;
    assert!(!res.headers.contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN));
    let on = server(|s| s.server.cors_allow_origins = vec!["https://app.example".into()]);
    let res = send(&on.router, preflight()?).await;
    assert_eq!(res.headers.get(header::ACCESS_CONTROL_ALLOW_ORIGIN).and_then(|v| v.to_str().ok()), Some("https://app.example"));
    assert!(!res.headers.contains_key(header::ACCESS_CONTROL_ALLOW_CREDENTIALS));
    let other = Request::builder()
        .method("OPTIONS")
        .uri("/v1/completions")
        .header(header::ORIGIN, "https://evil.example")
        .header(header::ACCESS_CONTROL_REQUEST_METHOD, "POST")
        .body(Body::empty())?;
    assert!(!send(&on.router, other).await.headers.contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN));
    Ok(())
}
