//! The documented error codes: one closed enum, one place that maps each to
//! its code string, message and HTTP status (docs/error-codes.md, a copy of
//! the project's table; a test holds the two together). Never renumber or
//! reword: gateways and their clients match on these strings.

use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum ErrorCode {
    UnknownError,
    InternalError,
    ServiceUnavailable,
    NoAvailableKey,
    AllKeyError,
    NoAvailableModelAgent,
    AllModelAgentError,
    ModelAgentDisabled,
    NoAvailableModelAgentKey,
    AllModelAgentKeyError,
    FallbackModelDisabled,
    InvalidParameter,
    UnsupportedFileFormat,
    InvalidRequestError,
    InvalidApiKey,
    ApiKeyDisabled,
    InvalidReseller,
    ResellerDisabled,
    InvalidUser,
    UserDisabled,
    InvalidApp,
    AppDisabled,
    ModelDisabled,
    GroupDisabled,
    GroupExpired,
    Forbidden,
    UnknownUrl,
    ModelNotFound,
    PathNotFound,
    GroupNotFound,
    ResellerInsufficientQuota,
    ResellerQuotaExpired,
    InsufficientQuota,
    AccountQuotaExpired,
    AppQuotaExpired,
    KeyQuotaExpired,
    GroupInsufficientQuota,
    /// An addition (contract, "Holds"): step 14 of the check order.
    ConcurrencyLimitExceeded,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 38] = [
        ErrorCode::UnknownError,
        ErrorCode::InternalError,
        ErrorCode::ServiceUnavailable,
        ErrorCode::NoAvailableKey,
        ErrorCode::AllKeyError,
        ErrorCode::NoAvailableModelAgent,
        ErrorCode::AllModelAgentError,
        ErrorCode::ModelAgentDisabled,
        ErrorCode::NoAvailableModelAgentKey,
        ErrorCode::AllModelAgentKeyError,
        ErrorCode::FallbackModelDisabled,
        ErrorCode::InvalidParameter,
        ErrorCode::UnsupportedFileFormat,
        ErrorCode::InvalidRequestError,
        ErrorCode::InvalidApiKey,
        ErrorCode::ApiKeyDisabled,
        ErrorCode::InvalidReseller,
        ErrorCode::ResellerDisabled,
        ErrorCode::InvalidUser,
        ErrorCode::UserDisabled,
        ErrorCode::InvalidApp,
        ErrorCode::AppDisabled,
        ErrorCode::ModelDisabled,
        ErrorCode::GroupDisabled,
        ErrorCode::GroupExpired,
        ErrorCode::Forbidden,
        ErrorCode::UnknownUrl,
        ErrorCode::ModelNotFound,
        ErrorCode::PathNotFound,
        ErrorCode::GroupNotFound,
        ErrorCode::ResellerInsufficientQuota,
        ErrorCode::ResellerQuotaExpired,
        ErrorCode::InsufficientQuota,
        ErrorCode::AccountQuotaExpired,
        ErrorCode::AppQuotaExpired,
        ErrorCode::KeyQuotaExpired,
        ErrorCode::GroupInsufficientQuota,
        ErrorCode::ConcurrencyLimitExceeded,
    ];

    /// (code, message, HTTP status) exactly as documented.
    pub fn spec(self) -> (&'static str, &'static str, u16) {
        use ErrorCode::*;
        match self {
            UnknownError => ("-1", "Unknown Error.", 500),
            InternalError => ("500", "Internal Error.", 500),
            ServiceUnavailable => ("503", "Service Unavailable.", 503),
            NoAvailableKey => ("fastapi_error", "No available key.", 500),
            AllKeyError => ("fastapi_error", "All key error.", 500),
            NoAvailableModelAgent => ("fastapi_error", "No available model agent.", 500),
            AllModelAgentError => ("fastapi_error", "All model agent error.", 500),
            ModelAgentDisabled => ("fastapi_error", "Model agent has been disabled.", 500),
            NoAvailableModelAgentKey => ("fastapi_error", "No available model agent key.", 500),
            AllModelAgentKeyError => ("fastapi_error", "All model agent key error.", 500),
            FallbackModelDisabled => ("fastapi_error", "Model has been disabled.", 500),
            InvalidParameter => ("invalid_parameter", "Invalid Parameter.", 400),
            UnsupportedFileFormat => ("unsupported_file_format", "Unsupported file format.", 400),
            InvalidRequestError => (
                "invalid_request_error",
                "You didn't provide an API key.",
                401,
            ),
            InvalidApiKey => (
                "invalid_api_key",
                "Incorrect API key provided or has been disabled.",
                401,
            ),
            ApiKeyDisabled => ("api_key_disabled", "Key has been disabled.", 401),
            InvalidReseller => (
                "invalid_reseller",
                "Reseller does not exist or has been disabled.",
                401,
            ),
            ResellerDisabled => ("reseller_disabled", "Reseller has been disabled.", 401),
            InvalidUser => (
                "invalid_user",
                "User does not exist or has been disabled.",
                401,
            ),
            UserDisabled => ("user_disabled", "User has been disabled.", 401),
            InvalidApp => (
                "invalid_app",
                "App does not exist or has been disabled.",
                401,
            ),
            AppDisabled => ("app_disabled", "App has been disabled.", 401),
            ModelDisabled => ("model_disabled", "Model has been disabled.", 401),
            GroupDisabled => ("group_disabled", "Group has been disabled.", 401),
            GroupExpired => ("group_expired", "Group has expired.", 401),
            Forbidden => ("forbidden", "Forbidden.", 403),
            UnknownUrl => ("unknown_url", "Unknown request URL.", 404),
            ModelNotFound => (
                "model_not_found",
                "The model does not exist or you do not have access to it.",
                404,
            ),
            PathNotFound => (
                "path_not_found",
                "The path does not exist or you do not have access to it.",
                404,
            ),
            GroupNotFound => (
                "group_not_found",
                "The group does not exist or you do not have access to it.",
                404,
            ),
            ResellerInsufficientQuota => (
                "reseller_insufficient_quota",
                "You reseller exceeded current quota.",
                429,
            ),
            ResellerQuotaExpired => (
                "reseller_quota_expired",
                "You reseller quota has expired.",
                429,
            ),
            InsufficientQuota => (
                "insufficient_quota",
                "You exceeded your current quota.",
                429,
            ),
            AccountQuotaExpired => (
                "account_quota_expired",
                "You account quota has expired.",
                429,
            ),
            AppQuotaExpired => ("app_quota_expired", "You app quota has expired.", 429),
            KeyQuotaExpired => ("key_quota_expired", "You key quota has expired.", 429),
            GroupInsufficientQuota => (
                "group_insufficient_quota",
                "Group exceeded current quota.",
                429,
            ),
            ConcurrencyLimitExceeded => (
                "concurrency_limit_exceeded",
                "Too many requests in flight.",
                429,
            ),
        }
    }

    pub fn code(self) -> &'static str {
        self.spec().0
    }
    pub fn message(self) -> &'static str {
        self.spec().1
    }
    pub fn http_status(self) -> u16 {
        self.spec().2
    }
    /// `fastapi_request_error` for 4xx, `fastapi_error` for 5xx.
    pub fn error_type(self) -> &'static str {
        if self.http_status() >= 500 {
            "fastapi_error"
        } else {
            "fastapi_request_error"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every row of the project's table is one variant, with the same code,
    /// message and status, and every variant is a row.
    #[test]
    fn enum_matches_the_documented_table() {
        let doc = include_str!("../docs/error-codes.md");
        let mut rows = Vec::new();
        for line in doc.lines() {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            if cells.len() < 5 || !cells[1].starts_with('`') {
                continue;
            }
            let code = cells[1].trim_matches('`');
            let status: u16 = cells[3]
                .trim_end_matches('*')
                .parse()
                .expect("status column");
            rows.push((code, cells[2], status));
        }
        assert_eq!(
            rows.len(),
            ErrorCode::ALL.len(),
            "table rows vs enum variants"
        );
        for (i, c) in ErrorCode::ALL.iter().enumerate() {
            assert_eq!(c.spec(), rows[i], "variant {c:?}");
        }
    }
}
