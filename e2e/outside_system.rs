//! A stand-in outside system for the gateway scenarios: an HTTP server on 127.0.0.1
//! that records the JSON it is sent and answers 500 to its first requests (so that the
//! gateway's retries are exercised), 200 after. Used by `tests/e2e.rs`.

use serde_json::Value;
use std::sync::Mutex;
use std::time::Duration;

/// A stand-in outside system: takes POSTed JSON on 127.0.0.1, answers 500 to the first
/// `fail_first` requests (to exercise the gateway's retries), 200 after.
pub struct OutsideSystem {
    pub port: u16,
    received: std::sync::Arc<Mutex<Vec<Value>>>,
}

impl OutsideSystem {
    pub fn start(fail_first: usize) -> OutsideSystem {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("address").port();
        let received = std::sync::Arc::new(Mutex::new(Vec::new()));
        let seen = received.clone();
        std::thread::spawn(move || {
            let mut served = 0usize;
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let mut data = Vec::new();
                let mut buf = [0u8; 4096];
                // Headers, then as many body bytes as Content-Length says.
                let body = loop {
                    let Ok(n) = stream.read(&mut buf) else {
                        break None;
                    };
                    if n == 0 {
                        break None;
                    }
                    data.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&data).to_string();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let length: usize = text[..end]
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        if data.len() >= end + 4 + length {
                            break Some(data[end + 4..end + 4 + length].to_vec());
                        }
                    }
                };
                served += 1;
                let ok = served > fail_first;
                if ok
                    && let Some(body) = body.and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                {
                    seen.lock().unwrap_or_else(|p| p.into_inner()).push(body);
                }
                let status = if ok {
                    "200 OK"
                } else {
                    "500 Internal Server Error"
                };
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
                );
            }
        });
        OutsideSystem { port, received }
    }

    pub fn events(&self) -> Vec<Value> {
        self.received
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}
