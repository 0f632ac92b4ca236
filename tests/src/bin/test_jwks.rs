//! An identity provider's key endpoint over HTTPS: `GET
//! /.well-known/jwks.json` answers the JWKS file as it is now (rewrite the
//! file to rotate keys); any other path is 404. One line per fetch goes to
//! `--log`, so tests count fetches.

use std::{convert::Infallible, io::Write, net::SocketAddr, path::PathBuf, sync::Arc};

use bytes::Bytes;
use clap::Parser;
use http_body_util::Full;
use hyper::{server::conn::http1, service::service_fn, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

#[derive(Parser)]
#[command(about = "HTTPS JWKS endpoint for tests")]
struct Args {
    #[arg(long)]
    listen: SocketAddr,
    #[arg(long)]
    cert: PathBuf,
    #[arg(long)]
    key: PathBuf,
    /// The JWKS document served (read at every fetch).
    #[arg(long)]
    jwks: PathBuf,
    /// One line per fetch.
    #[arg(long)]
    log: PathBuf,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let acceptor = llm_egress_tests::gateway_lab::tls_acceptor(&args.cert, &args.key)?;
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let (jwks, log) = (Arc::new(args.jwks), Arc::new(args.log));
    println!("listening");
    loop {
        let (tcp, _) = listener.accept().await?;
        let (acceptor, jwks, log) = (acceptor.clone(), jwks.clone(), log.clone());
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let (jwks, log) = (jwks.clone(), log.clone());
                async move {
                    if req.uri().path() != "/.well-known/jwks.json" {
                        let mut r = Response::new(Full::new(Bytes::new()));
                        *r.status_mut() = StatusCode::NOT_FOUND;
                        return Ok::<_, Infallible>(r);
                    }
                    if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(&*log) {
                        let _ = writeln!(f, "{}", req.uri());
                    }
                    let body = std::fs::read(&*jwks).unwrap_or_default();
                    let mut r = Response::new(Full::new(Bytes::from(body)));
                    r.headers_mut()
                        .insert("content-type", "application/json".parse().unwrap());
                    Ok(r)
                }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(tls), svc)
                .await;
        });
    }
}
