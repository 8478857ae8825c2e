//! The scripted responses to `POST /vps/register`, one used per accepted
//! request.

use std::collections::VecDeque;
use std::fmt;
use std::str::FromStr;

/// One response of the fake platform to an authorized, valid registration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScriptedResponse {
    /// `200 {"registered": true, "status": "running"}`. When a bucket is
    /// configured, `system/vps-meta.json` is written first; if that write
    /// fails the body also carries `"warnings":
    /// ["vps_meta_persistence_failed"]`, as on the real platform.
    Register,
    /// The same 200 with the `vps_meta_persistence_failed` warning, without
    /// writing `vps-meta.json`: the platform's storage failed, so the host
    /// must write the metadata itself.
    RegisterWithoutMeta,
    /// This HTTP status with a body `{"error": "<reason>"}`. Meant for
    /// error statuses such as 400, 401, 404, 409, 429 and 500.
    Status(u16),
    /// Closes the connection without sending a response.
    DropConnection,
}

/// Error for a response script entry that is not one of `ok`,
/// `ok-no-meta`, `drop` or an HTTP status from 100 to 599.
#[derive(Debug, thiserror::Error)]
#[error(
    "invalid scripted response '{0}': expected ok, ok-no-meta, drop or an HTTP status such as 500"
)]
pub struct InvalidScriptedResponse(String);

impl FromStr for ScriptedResponse {
    type Err = InvalidScriptedResponse;

    /// Parses `ok` (or `200`), `ok-no-meta`, `drop`, or a status code.
    fn from_str(text: &str) -> Result<ScriptedResponse, InvalidScriptedResponse> {
        match text.trim() {
            "ok" | "200" => Ok(ScriptedResponse::Register),
            "ok-no-meta" => Ok(ScriptedResponse::RegisterWithoutMeta),
            "drop" => Ok(ScriptedResponse::DropConnection),
            other => match other.parse::<u16>() {
                Ok(status) if (100..=599).contains(&status) => Ok(ScriptedResponse::Status(status)),
                _ => Err(InvalidScriptedResponse(text.to_string())),
            },
        }
    }
}

impl fmt::Display for ScriptedResponse {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScriptedResponse::Register => formatter.write_str("ok"),
            ScriptedResponse::RegisterWithoutMeta => formatter.write_str("ok-no-meta"),
            ScriptedResponse::DropConnection => formatter.write_str("drop"),
            ScriptedResponse::Status(status) => write!(formatter, "{status}"),
        }
    }
}

/// Parses a comma-separated script such as `500,500,drop,ok`. An empty
/// string is an empty script.
pub fn parse_script(text: &str) -> Result<Vec<ScriptedResponse>, InvalidScriptedResponse> {
    text.split(',')
        .filter(|entry| !entry.trim().is_empty())
        .map(str::parse)
        .collect()
}

/// The queue of scripted responses, and the fallback response sent once
/// the queue is empty.
#[derive(Debug)]
pub(crate) struct Script {
    queue: VecDeque<ScriptedResponse>,
    fallback: ScriptedResponse,
}

impl Script {
    pub(crate) fn new(responses: Vec<ScriptedResponse>, fallback: ScriptedResponse) -> Script {
        Script {
            queue: responses.into(),
            fallback,
        }
    }

    /// Takes the next response, or the fallback when the queue is empty.
    pub(crate) fn next_response(&mut self) -> ScriptedResponse {
        self.queue
            .pop_front()
            .unwrap_or_else(|| self.fallback.clone())
    }

    pub(crate) fn replace(&mut self, responses: Vec<ScriptedResponse>) {
        self.queue = responses.into();
    }

    pub(crate) fn push(&mut self, response: ScriptedResponse) {
        self.queue.push_back(response);
    }

    pub(crate) fn set_fallback(&mut self, fallback: ScriptedResponse) {
        self.fallback = fallback;
    }

    pub(crate) fn remaining(&self) -> usize {
        self.queue.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_parses_every_kind() {
        let script = parse_script("500, 503,drop,ok-no-meta,ok,200,429").unwrap();
        assert_eq!(
            script,
            [
                ScriptedResponse::Status(500),
                ScriptedResponse::Status(503),
                ScriptedResponse::DropConnection,
                ScriptedResponse::RegisterWithoutMeta,
                ScriptedResponse::Register,
                ScriptedResponse::Register,
                ScriptedResponse::Status(429),
            ]
        );
    }

    #[test]
    fn script_rejects_unknown_entries() {
        for text in ["okay", "600", "99", "5OO", "-1"] {
            let error = parse_script(text).unwrap_err();
            assert!(error.to_string().contains(text), "{error}");
        }
    }

    #[test]
    fn empty_script_is_empty() {
        assert_eq!(parse_script("").unwrap(), []);
        assert_eq!(parse_script(" , ").unwrap(), []);
    }

    #[test]
    fn script_falls_back_when_empty() {
        let mut script = Script::new(
            vec![
                ScriptedResponse::Status(500),
                ScriptedResponse::DropConnection,
            ],
            ScriptedResponse::Register,
        );
        assert_eq!(script.next_response(), ScriptedResponse::Status(500));
        assert_eq!(script.next_response(), ScriptedResponse::DropConnection);
        assert_eq!(script.next_response(), ScriptedResponse::Register);
        assert_eq!(script.next_response(), ScriptedResponse::Register);
        assert_eq!(script.remaining(), 0);
    }

    #[test]
    fn display_round_trips() {
        for text in ["ok", "ok-no-meta", "drop", "409"] {
            let response: ScriptedResponse = text.parse().unwrap();
            assert_eq!(response.to_string(), text);
        }
    }
}
