//! The simulator as a gateway with holds (`simulate --holds`): per request,
//! admission with a hold priced from the request's worst case, then the
//! usage event naming the hold; a failed request releases its hold.

use serde_json::{json, Value};

use super::Booking;

/// A gateway's client of the API: its address and a `gateway` token.
pub struct Gateway {
    pub addr: String,
    pub token: String,
    pub placed: usize,
    pub refused: usize,
    pub released: usize,
}

impl Gateway {
    pub fn new(addr: &str, token: &str) -> Gateway {
        Gateway {
            addr: addr.to_string(),
            token: token.to_string(),
            placed: 0,
            refused: 0,
            released: 0,
        }
    }

    /// Wait (up to a minute) until the service admits `secret`'s requests:
    /// the registry just produced is applied and in the admission view. A
    /// gateway sends nothing for keys the service does not know yet.
    pub async fn wait_for_registry(&self, secret: &str) -> anyhow::Result<()> {
        let body = json!({"api_key": secret, "client_ip": "203.0.113.7", "model": "gpt-4o", "path": "/v1/chat/completions"});
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let (status, answer) = super::http_json(&self.addr, &self.token, "POST", "/v1/admission", Some(&body)).await?;
            if status == 200 {
                return Ok(());
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "the service still refuses the simulated keys after a minute: {answer}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// Ask for admission with a hold on the usage's worst case (the
    /// request's output limit: here twice what it will produce, at least
    /// 256 tokens). Returns the event to produce: with the hold's id, or
    /// without it for a failed request (its hold released); None when the
    /// request is refused (no request is made, no usage follows).
    pub async fn request(&mut self, usage_event: &Value, b: &Booking) -> anyhow::Result<Option<Value>> {
        let u = &usage_event["usage"];
        let worst = json!({
            "input_tokens": u["input_tokens"], "cache_read_tokens": u["cache_read_tokens"],
            "output_tokens": (u["output_tokens"].as_u64().unwrap_or(0) * 2).max(256),
        });
        let body = json!({"api_key": b.secret, "client_ip": "203.0.113.7", "model": usage_event["model"],
            "path": usage_event["path"], "trace_id": usage_event["trace_id"], "hold": {"usage": worst}});
        let (status, answer) = super::http_json(&self.addr, &self.token, "POST", "/v1/admission", Some(&body)).await?;
        if status != 200 {
            if status == 429 || status == 401 || status == 404 {
                self.refused += 1;
                return Ok(None);
            }
            anyhow::bail!("admission answered {status}: {answer}");
        }
        let hold_id = answer["hold"]["id"]
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("admission allowed without a hold: {answer}"))?
            .to_string();
        self.placed += 1;
        let mut event = usage_event.clone();
        if event["status"] == "failed" {
            // Nothing was produced upstream: give the credit back now.
            let (status, h) = super::http_json(&self.addr, &self.token, "DELETE", &format!("/v1/holds/{hold_id}"), None).await?;
            anyhow::ensure!(status == 200, "release answered {status}: {h}");
            self.released += 1;
        } else {
            event["reservation_id"] = json!(hold_id);
        }
        Ok(Some(event))
    }
}
