//! Classifying SDK errors for the relay: is it the destination/transport (retry later) or the
//! content of the request (retrying the same bytes will fail again)?

use aws_sdk_sqs::config::http::HttpResponse;
use aws_sdk_sqs::error::{ProvideErrorMetadata, SdkError};
use outbox::publisher::batch::RequestFailure;

/// Error codes that mean "try again later" whatever the HTTP status.
const TRANSIENT_CODES: &[&str] = &[
    // throttling
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottled",
    "RequestThrottledException",
    "TooManyRequestsException",
    "RequestLimitExceeded",
    "ProvisionedThroughputExceededException",
    "SlowDown",
    "LimitExceededException",
    "KmsThrottled",
    "KMS.ThrottlingException",
    // server side
    "InternalError",
    "InternalFailure",
    "InternalException",
    "ServiceUnavailable",
    "ServiceUnavailableException",
    // credentials and permissions: fixed by operators, not by changing the event
    "AccessDenied",
    "AccessDeniedException",
    "InvalidClientTokenId",
    "UnrecognizedClientException",
    "ExpiredToken",
    "ExpiredTokenException",
    "SignatureDoesNotMatch",
    "InvalidSignatureException",
    "IncompleteSignature",
    "MissingAuthenticationToken",
    "RequestExpired",
    "InvalidSecurity",
    "NotAuthorizedForSourceException",
    // the destination is missing (deleted, or not created yet): fixed by creating it
    "QueueDoesNotExist",
    "AWS.SimpleQueueService.NonExistentQueue",
    "ResourceNotFoundException",
    "NoSuchBucket",
];

/// True when an error code is transient (see [`TRANSIENT_CODES`]); also any code that says it.
pub(crate) fn is_transient_code(code: &str) -> bool {
    TRANSIENT_CODES.contains(&code) || code.contains("Throttl") || code.contains("Internal")
}

/// True when an entry-level code says the destination is throttling: the destination's failure,
/// not the entry's.
pub(crate) fn is_throttling_code(code: &str) -> bool {
    code.contains("Throttl")
        || code == "SlowDown"
        || code.contains("TooManyRequests")
        || code.contains("LimitExceeded")
}

/// Classifies a failed call.
pub(crate) fn classify<E>(error: &SdkError<E, HttpResponse>, what: &str) -> RequestFailure
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    match error {
        SdkError::ServiceError(service) => {
            let status = service.raw().status().as_u16();
            let err = service.err();
            let code = err.code().unwrap_or("Unknown");
            let message = err.message().unwrap_or("no message");
            let text = format!("{what} failed: {code} (HTTP {status}): {message}");
            if status >= 500 || status == 429 || is_transient_code(code) {
                RequestFailure::Transient(text)
            } else {
                RequestFailure::Content(text)
            }
        }
        // Could not build the request (e.g. a field SDK-side validation refused): the content.
        SdkError::ConstructionFailure(_) => {
            RequestFailure::Content(format!("{what} failed: {}", error_chain(error)))
        }
        // Timeouts, connection refused, unparseable responses: transport.
        _ => RequestFailure::Transient(format!("{what} failed: {}", error_chain(error))),
    }
}

/// The error and its sources on one line: the SDK's top-level messages ("dispatch failure")
/// alone do not say what happened.
pub(crate) fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        let next = inner.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = inner.source();
    }
    text
}

/// The service error code of a failed call, if the service answered.
pub(crate) fn service_code<E>(error: &SdkError<E, HttpResponse>) -> Option<String>
where
    E: ProvideErrorMetadata,
{
    match error {
        SdkError::ServiceError(service) => service.err().code().map(str::to_owned),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttling_and_server_codes_are_transient() {
        for code in [
            "ThrottlingException",
            "RequestThrottled",
            "InternalFailure",
            "KMS.ThrottlingException",
        ] {
            assert!(is_transient_code(code), "{code}");
        }
        for code in [
            "InvalidParameterValue",
            "MalformedDetail",
            "InvalidMessageContents",
            "BatchRequestTooLong",
        ] {
            assert!(!is_transient_code(code), "{code}");
        }
    }
}
