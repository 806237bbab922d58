//! Networks: `add_purpose` / `remove_purpose` (`nbd`, `insecure_nbd`).

use super::*;
use xapi_wire::ApiError;

impl State {
    pub fn add_purpose(&mut self, r: &str, purpose: &str) -> Result<(), ApiError> {
        if !self.networks.contains_key(r) {
            return Err(ApiError::handle_invalid("network", r));
        }
        if purpose != "nbd" && purpose != "insecure_nbd" {
            return Err(ApiError::new("INVALID_VALUE", ["purpose", purpose]));
        }
        let other = if purpose == "nbd" {
            "insecure_nbd"
        } else {
            "nbd"
        };
        if self
            .networks
            .values()
            .any(|n| n.purpose.iter().any(|p| p == other))
        {
            return Err(ApiError::new(
                "NETWORK_INCOMPATIBLE_PURPOSES",
                [purpose, other],
            ));
        }
        if let Some(n) = self.networks.get_mut(r) {
            if !n.purpose.iter().any(|p| p == purpose) {
                n.purpose.push(purpose.to_string());
            }
        }
        Ok(())
    }

    pub fn remove_purpose(&mut self, r: &str, purpose: &str) -> Result<(), ApiError> {
        let n = self
            .networks
            .get_mut(r)
            .ok_or_else(|| ApiError::handle_invalid("network", r))?;
        n.purpose.retain(|p| p != purpose);
        Ok(())
    }

    // ---- tasks ---------------------------------------------------------
}
