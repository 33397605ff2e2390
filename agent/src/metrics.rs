//! `/metrics` over HTTP, in the Prometheus text format.

/// Serves the registry in the Prometheus text format at `/metrics`; returns the bound address.
pub async fn serve(
    addr: std::net::SocketAddr,
    registry: prometheus_client::registry::Registry,
) -> std::io::Result<std::net::SocketAddr> {
    use axum::{http::header::CONTENT_TYPE, http::StatusCode, routing::get, Router};
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let registry = std::sync::Arc::new(registry);
    let metrics = get(move || {
        let registry = registry.clone();
        async move {
            let mut body = String::new();
            match prometheus_client::encoding::text::encode(&mut body, &registry) {
                Ok(()) => Ok((
                    [(
                        CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    body,
                )),
                Err(_) => Err(StatusCode::INTERNAL_SERVER_ERROR),
            }
        }
    });
    let app = Router::new().route("/metrics", metrics);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(bound)
}
