//! The README's quick start, followed literally: start the server as
//! `cargo run --release` does (the binary, no arguments, from the repository
//! root), run every documented `curl` command and the Python snippet, and
//! check the answers are well-formed with non-empty text.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::*;

/// The fenced blocks of the README's "Quick start" section, with their
/// language tags.
fn quick_start_blocks() -> Vec<(String, String)> {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).expect("README.md");
    let start = readme.find("## Quick start").expect("a Quick start section");
    let section = &readme[start..];
    let end = section[3..].find("\n## ").map_or(section.len(), |i| i + 3);
    let mut blocks = vec![];
    let mut lines = section[..end].lines();
    while let Some(line) = lines.next() {
        if let Some(lang) = line.strip_prefix("```") {
            let body: Vec<&str> = lines.by_ref().take_while(|l| !l.starts_with("```")).collect();
            blocks.push((lang.to_string(), body.join("\n")));
        }
    }
    blocks
}

/// Shell commands of a block, with `\` continuations joined and comments dropped.
fn commands(block: &str) -> Vec<String> {
    let mut out = vec![];
    let mut cur = String::new();
    for line in block.lines() {
        let line = line.trim_end();
        if cur.is_empty() && (line.trim().is_empty() || line.trim_start().starts_with('#')) {
            continue;
        }
        if let Some(head) = line.strip_suffix('\\') {
            cur.push_str(head);
            cur.push(' ');
        } else {
            cur.push_str(line);
            out.push(std::mem::take(&mut cur));
        }
    }
    out
}

fn text_of_answer(v: &Value) -> String {
    let c = &v["choices"][0];
    c["text"].as_str().or_else(|| c["message"]["content"].as_str()).unwrap_or("").to_string()
}

#[test]
fn the_readme_quick_start_works_as_written() -> TestResult {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let blocks = quick_start_blocks();
    let setup = commands(&blocks.iter().find(|(l, _)| l == "sh").expect("a sh block").1);
    assert!(setup[0].starts_with("cargo run --release"), "the first command runs the server: {setup:?}");
    assert!(setup[0].split('#').next().unwrap_or("").trim() == "cargo run --release", "with no arguments: {:?}", setup[0]);

    // `cargo run --release` is the binary with no arguments, from the root.
    let mut server =
        Command::new(serve_binary()).current_dir(root).env("RUST_LOG", "warn").stdout(Stdio::null()).stderr(Stdio::piped()).spawn()?;
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut stderr = server.stderr.take().expect("piped");
    let _guard = Kill(server);
    let mut banner = String::new();
    let started = Instant::now();
    // Read until the curl line has arrived whole (up to its newline).
    let complete = |b: &str| b.split_inclusive('\n').any(|l| l.trim_start().starts_with("curl ") && l.ends_with('\n'));
    while !complete(&banner) {
        let mut b = [0u8; 1024];
        let n = stderr.read(&mut b)?;
        assert!(n > 0, "the server exited: {banner}");
        banner.push_str(&String::from_utf8_lossy(&b[..n]));
        assert!(started.elapsed() < Duration::from_secs(60), "no start-up banner: {banner}");
    }
    std::thread::spawn(move || {
        let mut sink = [0u8; 4096];
        while matches!(stderr.read(&mut sink), Ok(n) if n > 0) {}
    });
    assert!(banner.contains("listening on http://127.0.0.1:8080"), "{banner}");
    let printed = banner.lines().map(str::trim).find(|l| l.starts_with("curl ")).expect("a ready-to-paste curl command").to_string();

    // The printed command and every documented one.
    let docs = commands(&blocks.iter().filter(|(l, _)| l == "sh").nth(1).expect("a second sh block").1);
    assert!(docs.len() >= 3, "completion, stream and chat examples: {docs:?}");
    for cmd in std::iter::once(printed).chain(docs) {
        let out = Command::new("sh").arg("-c").arg(&cmd).output()?;
        assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
        let body = String::from_utf8(out.stdout)?;
        if cmd.contains("\"stream\": true") {
            let events = crate::http::sse_data(body.as_bytes());
            assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{cmd}");
            let text: String = events[..events.len() - 1]
                .iter()
                .map(|e| serde_json::from_str::<Value>(e).map(|v| text_of_answer(&v)))
                .collect::<Result<_, _>>()?;
            assert!(!text.trim().is_empty(), "{cmd}: empty streamed text");
        } else {
            let v: Value = serde_json::from_str(&body).map_err(|e| format!("{cmd}: {e}: {body}"))?;
            assert!(v.get("error").is_none(), "{cmd}: {v}");
            assert!(!text_of_answer(&v).trim().is_empty(), "{cmd}: empty text in {v}");
        }
    }

    // The Python snippet, with the official client.
    let python = blocks.iter().find(|(l, _)| l == "python").expect("a python block").1.clone();
    let interpreter = std::env::var("MAMBA_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(interpreter).arg("-c").arg(&python).output()?;
    assert!(out.status.success(), "the python example failed (run scripts/test.sh): {}", String::from_utf8_lossy(&out.stderr));
    assert!(!String::from_utf8(out.stdout)?.trim().is_empty(), "the python example printed nothing");

    // The offline example.
    let offline = blocks.iter().filter(|(l, _)| l == "sh").nth(2).map(|b| commands(&b.1)).unwrap_or_default();
    let first = offline.first().expect("an offline generate example");
    let args = first.strip_prefix("cargo run --release -- ").expect("a cargo run example");
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("\"$BIN\" {args}"))
        .env("BIN", serve_binary())
        .current_dir(root)
        .env("RUST_LOG", "warn")
        .output()?;
    assert!(out.status.success(), "{first}: {}", String::from_utf8_lossy(&out.stderr));
    assert!(!String::from_utf8(out.stdout)?.trim().is_empty(), "{first}: no text");
    Ok(())
}
