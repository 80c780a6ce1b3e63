//! The server's HTTP API as the load generator uses it: reset, `/metrics` and per-app
//! queries, over one keep-alive connection with timeouts.
//!
//! Failing to reach the server is an [`ApiError`], which ends the run with exit code 2; a
//! reachable server that answers with an unexpected status is reported by the caller.

use std::net::SocketAddr;
use std::time::Duration;

/// How long one request may take, connection included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The server could not be reached, or its answer could not be read.
#[derive(Debug)]
pub struct ApiError(pub String);

/// An HTTP answer: status and body.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: String,
}

/// A keep-alive client for the server at one address.
pub struct Api {
    agent: ureq::Agent,
    http_addr: SocketAddr,
}

impl Api {
    pub fn new(http_addr: SocketAddr) -> Api {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            // Statuses are checked by the caller, which knows what it expected.
            .http_status_as_error(false)
            .timeout_global(Some(REQUEST_TIMEOUT))
            // The target is loopback, and an HTTP_PROXY from the environment must not divert
            // it to another host.
            .proxy(None)
            .build()
            .into();
        Api { agent, http_addr }
    }

    /// `DELETE /events`, which must answer 204.
    pub fn reset(&self) -> Result<(), ApiError> {
        let reply = self.request("DELETE", "/events")?;
        if reply.status == 204 {
            Ok(())
        } else {
            Err(ApiError(format!(
                "http {}: DELETE /events answered {}, expected 204: {}",
                self.http_addr,
                reply.status,
                excerpt(&reply.body)
            )))
        }
    }

    /// The text of `GET /metrics`, which must answer 200.
    pub fn metrics(&self) -> Result<String, ApiError> {
        let reply = self.request("GET", "/metrics")?;
        if reply.status == 200 {
            Ok(reply.body)
        } else {
            Err(ApiError(format!(
                "http {}: GET /metrics answered {}: {}",
                self.http_addr,
                reply.status,
                excerpt(&reply.body)
            )))
        }
    }

    /// `GET /events/{sha}`, whatever its status.
    pub fn query(&self, sha_hex: &str) -> Result<Reply, ApiError> {
        self.request("GET", &format!("/events/{sha_hex}"))
    }

    fn request(&self, method: &str, path: &str) -> Result<Reply, ApiError> {
        let url = format!("http://{}{path}", self.http_addr);
        let fail =
            |e: ureq::Error| ApiError(format!("http {}: {method} {path}: {e}", self.http_addr));
        let response = match method {
            "DELETE" => self.agent.delete(&url).call(),
            _ => self
                .agent
                .get(&url)
                .header("Accept", "application/json")
                .call(),
        };
        let mut response = response.map_err(fail)?;
        let status = response.status().as_u16();
        let body = response.body_mut().read_to_string().map_err(fail)?;
        Ok(Reply { status, body })
    }
}

/// The start of a body, on one line, for error messages.
pub fn excerpt(body: &str) -> String {
    let line: String = body.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.chars().count() > 200 {
        format!("{}...", line.chars().take(200).collect::<String>())
    } else {
        line
    }
}
