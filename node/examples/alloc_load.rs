//! Load for `bench/alloc.py`: C concurrent clients, each on its own keep-alive connection to an
//! agent's control socket, loop `endpoint create` then `endpoint rm` in one network for S
//! seconds. Prints one JSON line: pairs done, seconds, and create latency p50/p99 in ms.
//!
//! usage: cargo run --release -p weft-node --example alloc_load -- SOCKET NETWORK CLIENTS SECONDS

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;

async fn client(sock: String, network: String, k: usize, until: Instant) -> anyhow::Result<(u64, Vec<f64>)> {
    let stream = tokio::net::UnixStream::connect(&sock).await?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut pairs = 0u64;
    let mut lat = Vec::new();
    let mut i = 0u64;
    while Instant::now() < until {
        let name = format!("load{k}-{i}");
        i += 1;
        let body = format!("{{\"name\":\"{name}\"}}");
        let req = Request::post(format!("http://weft/networks/{network}/endpoints"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))?;
        let t0 = Instant::now();
        let resp = tx.send_request(req).await?;
        let status = resp.status();
        let got = resp.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            anyhow::bail!("create {name}: {status} {}", String::from_utf8_lossy(&got));
        }
        lat.push(t0.elapsed().as_secs_f64() * 1e3);
        let req = Request::delete(format!("http://weft/networks/{network}/endpoints/{name}"))
            .body(Full::new(Bytes::new()))?;
        let resp = tx.send_request(req).await?;
        let status = resp.status();
        let got = resp.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            anyhow::bail!("rm {name}: {status} {}", String::from_utf8_lossy(&got));
        }
        pairs += 1;
    }
    Ok((pairs, lat))
}

fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v[((p / 100.0) * (v.len() - 1) as f64).round() as usize]
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, sock, network, clients, seconds] = &args[..] else {
        anyhow::bail!("usage: alloc_load SOCKET NETWORK CLIENTS SECONDS");
    };
    let clients: usize = clients.parse()?;
    let seconds: f64 = seconds.parse()?;
    let t0 = Instant::now();
    let until = t0 + Duration::from_secs_f64(seconds);
    let tasks: Vec<_> =
        (0..clients).map(|k| tokio::spawn(client(sock.clone(), network.clone(), k, until))).collect();
    let mut pairs = 0;
    let mut lat = Vec::new();
    for t in tasks {
        let (p, l) = t.await??;
        pairs += p;
        lat.extend(l);
    }
    let elapsed = t0.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    println!(
        "{{\"pairs\":{pairs},\"seconds\":{elapsed:.3},\"create_p50_ms\":{:.3},\"create_p99_ms\":{:.3}}}",
        pct(&lat, 50.0),
        pct(&lat, 99.0)
    );
    Ok(())
}
