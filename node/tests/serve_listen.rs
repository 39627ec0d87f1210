//! `shoal up --serve-listen ADDR [--api-token TOKEN]`: the OpenAI routes alone on a second
//! listener. A non-loopback ADDR without a token is refused; from inside a network
//! namespace this test creates, a LAN client reaches the routes with the token only, and
//! never the control API. The namespace test skips, saying why, where `ip netns` is not
//! permitted. Nothing here listens on 0.0.0.0.

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

/// One HTTP/1.1 request (`token` as a bearer token): the status code and the body.
fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {out:?}"));
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, body.to_string())
}

/// Runs `f` on a thread that has entered network namespace `ns` (only that thread does).
fn in_namespace<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        use std::os::fd::AsRawFd;
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .unwrap()
}

fn serve_addr(dir: &Path) -> SocketAddr {
    wait_until("serve.addr", Duration::from_secs(30), || {
        std::fs::read_to_string(dir.join("serve.addr"))
            .ok()?
            .trim()
            .parse()
            .ok()
    })
}

fn error_code(body: &str) -> String {
    let v: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"));
    v["error"]["code"].as_str().unwrap_or("").to_string()
}

#[test]
fn a_non_loopback_serve_listener_without_a_token_is_refused() {
    let dir = TempDir::new("serve-listen-refused");
    for addr in ["192.0.2.1:8080", "[2001:db8::1]:8080", "0.0.0.0:8080"] {
        // Loopback everywhere else, in case the refusal failed to come first.
        let out = run_shoal(&[
            "up",
            "--data-dir",
            dir.0.to_str().unwrap(),
            "--api",
            "127.0.0.1:0",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--data-listen",
            "127.0.0.1:0",
            "--no-mdns",
            "--serve-listen",
            addr,
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{addr}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(stderr.contains("--api-token"), "{stderr}");
        assert!(
            !dir.0.join("lock").exists(),
            "refused before touching the data dir"
        );
    }
}

#[test]
fn a_loopback_serve_listener_serves_only_the_openai_routes() {
    let dir = TempDir::new("serve-listen-loopback");
    let node = Node::start(
        &dir.0.join("n"),
        &[
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--data-listen",
            "127.0.0.1:0",
            "--no-mdns",
            "--serve-listen",
            "127.0.0.1:0",
        ],
    );
    let addr = serve_addr(&dir.0.join("n"));
    let (status, body) = request(addr, "GET", "/v1/models", None, "");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"object\":\"list\""), "{body}");
    for path in ["/v1/status", "/v1/jobs", "/v1/serve", "/metrics", "/"] {
        let (status, body) = request(addr, "GET", path, None, "");
        assert_eq!(status, 404, "{path}: {body}");
    }
    let (status, body) = request(addr, "POST", "/v1/infer", None, "{}");
    assert_eq!(status, 404, "{body}");
    // The control API is where it was.
    assert!(node.status().is_some());
}

#[test]
fn a_lan_client_in_a_namespace_needs_the_token() {
    let (_guard, namespaces) = match netns::build(2) {
        Ok(x) => x,
        Err(why) => {
            eprintln!("SKIP a_lan_client_in_a_namespace_needs_the_token: network namespaces not permitted here ({why})");
            return;
        }
    };
    let dir = TempDir::new("serve-listen-netns");
    let token = "lan-secret-0123456789";
    let node = Node::start_with_prefix(
        &dir.0.join("n"),
        &[
            "--listen",
            "/ip4/10.77.0.1/tcp/0",
            "--data-listen",
            "10.77.0.1:0",
            "--no-mdns",
            "--serve-listen",
            "10.77.0.1:0",
            "--api-token",
            token,
        ],
        &["ip", "netns", "exec", &namespaces[0]],
    );
    let addr = serve_addr(&dir.0.join("n"));
    assert_eq!(addr.ip().to_string(), "10.77.0.1");
    // The client is another machine on the LAN: namespace 1, 10.77.0.2.
    let answers = in_namespace(&namespaces[1], move || {
        let completion = r#"{"model": "nope", "prompt": "hi", "max_tokens": 1}"#;
        vec![
            request(addr, "GET", "/v1/models", None, ""),
            request(addr, "GET", "/v1/models", Some("wrong"), ""),
            request(
                addr,
                "GET",
                "/v1/models",
                Some(&token[..token.len() - 1]),
                "",
            ),
            request(addr, "POST", "/v1/completions", None, completion),
            request(addr, "GET", "/v1/status", None, ""),
            request(addr, "GET", "/v1/models", Some(token), ""),
            request(addr, "POST", "/v1/completions", Some(token), completion),
            request(addr, "GET", "/v1/status", Some(token), ""),
            request(addr, "POST", "/v1/serve", Some(token), "{}"),
        ]
    });
    for (status, body) in &answers[..5] {
        assert_eq!(*status, 401, "{body}");
        assert_eq!(error_code(body), "invalid_api_key", "{body}");
    }
    let (status, body) = &answers[5];
    assert_eq!(*status, 200, "{body}");
    assert!(body.contains("\"object\":\"list\""), "{body}");
    let (status, body) = &answers[6];
    assert_eq!(*status, 404, "{body}");
    assert_eq!(error_code(body), "model_not_found", "{body}");
    for (status, body) in &answers[7..] {
        assert_eq!(*status, 404, "{body}");
    }
    // The control API stays on the namespace's loopback.
    assert!(node.status().is_some());
}
