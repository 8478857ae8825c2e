//! The fault proxy's R2 mode: it must reject what R2 rejects, or the
//! suite run through it proves nothing about R2.
//!
//! The requests are unsigned, which moto accepts.

use matrix_agent_tests::bucket::Bucket;
use matrix_agent_tests::fault_proxy::{FaultProxy, ProxyMode};
use matrix_agent_tests::host::{user_prefix, BUCKET_NAME};
use matrix_agent_tests::moto::MotoServer;
use reqwest::blocking::Client;
use reqwest::StatusCode;

const MIB: usize = 1 << 20;

/// An S3 endpoint reached through a proxy in one mode, with a bucket.
struct Endpoint {
    http: Client,
    proxy: FaultProxy,
    _bucket: Bucket,
    _server: MotoServer,
}

impl Endpoint {
    fn start(mode: ProxyMode) -> Endpoint {
        let server = MotoServer::start();
        let bucket = Bucket::create(&server.endpoint(), BUCKET_NAME, &user_prefix());
        let proxy = FaultProxy::start(&server.endpoint(), mode);
        Endpoint {
            http: Client::new(),
            proxy,
            _bucket: bucket,
            _server: server,
        }
    }

    fn url(&self, key: &str, query: &str) -> String {
        format!("{}/{BUCKET_NAME}/{key}{query}", self.proxy.endpoint())
    }

    /// Uploads parts of the given sizes and completes the upload; returns
    /// the completion's status and body.
    fn multipart_upload(&self, key: &str, part_sizes: &[usize]) -> (StatusCode, String) {
        let created = self
            .http
            .post(self.url(key, "?uploads"))
            .send()
            .expect("sending CreateMultipartUpload");
        assert_eq!(created.status(), StatusCode::OK, "CreateMultipartUpload");
        let body = created.text().expect("reading CreateMultipartUpload");
        let upload_id = between(&body, "<UploadId>", "</UploadId>");

        let mut completion = String::from("<CompleteMultipartUpload>");
        for (index, size) in part_sizes.iter().enumerate() {
            let number = index + 1;
            let uploaded = self
                .http
                .put(self.url(key, &format!("?partNumber={number}&uploadId={upload_id}")))
                .body(vec![b'p'; *size])
                .send()
                .expect("sending UploadPart");
            assert_eq!(uploaded.status(), StatusCode::OK, "UploadPart {number}");
            let etag = uploaded.headers()["etag"]
                .to_str()
                .expect("an ASCII ETag")
                .to_owned();
            completion.push_str(&format!(
                "<Part><PartNumber>{number}</PartNumber><ETag>{etag}</ETag></Part>"
            ));
        }
        completion.push_str("</CompleteMultipartUpload>");

        let completed = self
            .http
            .post(self.url(key, &format!("?uploadId={upload_id}")))
            .body(completion)
            .send()
            .expect("sending CompleteMultipartUpload");
        let status = completed.status();
        (status, completed.text().expect("reading the completion"))
    }
}

fn between<'a>(text: &'a str, start: &str, end: &str) -> &'a str {
    let (_, rest) = text
        .split_once(start)
        .unwrap_or_else(|| panic!("{start} missing in {text}"));
    rest.split_once(end)
        .unwrap_or_else(|| panic!("{end} missing in {text}"))
        .0
}

#[test]
fn r2_mode_rejects_checksum_headers() {
    let endpoint = Endpoint::start(ProxyMode::R2);

    for header in [
        "x-amz-checksum-crc32",
        "x-amz-sdk-checksum-algorithm",
        "x-amz-trailer",
    ] {
        let response = endpoint
            .http
            .put(endpoint.url("system/probe", ""))
            .header(header, "AAAAAA==")
            .body("probe")
            .send()
            .expect("sending PutObject");
        assert_eq!(
            response.status(),
            StatusCode::NOT_IMPLEMENTED,
            "R2 mode accepted {header}"
        );
        let body = response.text().expect("reading the error");
        assert!(body.contains("NotImplemented"), "{header}: {body}");
    }

    let plain = endpoint
        .http
        .put(endpoint.url("system/probe", ""))
        .body("probe")
        .send()
        .expect("sending PutObject");
    assert_eq!(plain.status(), StatusCode::OK, "a PUT without checksums");
}

#[test]
fn r2_mode_rejects_unequal_parts() {
    let endpoint = Endpoint::start(ProxyMode::R2);

    let (status, body) = endpoint.multipart_upload("system/unequal", &[5 * MIB, 6 * MIB, 1]);
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "unequal middle part: {body}"
    );
    assert!(body.contains("InvalidPart"), "{body}");

    let (status, body) = endpoint.multipart_upload("system/larger-last", &[5 * MIB, 6 * MIB]);
    assert_eq!(status, StatusCode::BAD_REQUEST, "larger last part: {body}");
    assert!(body.contains("InvalidPart"), "{body}");

    let (status, body) = endpoint.multipart_upload("system/equal", &[5 * MIB, 5 * MIB, 1]);
    assert_eq!(status, StatusCode::OK, "equal parts, smaller last: {body}");
    assert!(body.contains("CompleteMultipartUploadResult"), "{body}");
}

#[test]
fn plain_mode_accepts_what_r2_rejects() {
    let endpoint = Endpoint::start(ProxyMode::Plain);

    let response = endpoint
        .http
        .put(endpoint.url("system/probe", ""))
        .header("x-amz-checksum-crc32", "AAAAAA==")
        .body("probe")
        .send()
        .expect("sending PutObject");
    assert_ne!(response.status(), StatusCode::NOT_IMPLEMENTED);

    let (status, body) = endpoint.multipart_upload("system/unequal", &[5 * MIB, 6 * MIB, 1]);
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("CompleteMultipartUploadResult"), "{body}");
}
