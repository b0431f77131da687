//! A small etcd v3 client over gRPC: the calls the etcd store and the
//! leader election make, against every member of a cluster in turn.
//!
//! A request goes to one member; if that member cannot answer (down, cut
//! off, no raft leader, timed out) it goes to the next, once around the
//! cluster. What a caller gets back is either etcd's answer or an
//! [`EtcdError`] that says whether the request may have been applied.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use wavegate_proto::etcd::{
    self as pb, compare, kv_client::KvClient, lease_client::LeaseClient, maintenance_client::MaintenanceClient,
    request_op,
};

/// The largest answer the client takes (a page of stored output, a big
/// rollout's host records).
const MAX_MESSAGE: usize = 64 << 20;

/// How long one request may take before the next member is tried.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// Where the cluster is and how to talk to it.
#[derive(Clone, Debug)]
pub struct EtcdConfig {
    /// `host:port` of every member (from `etcd://h1:p1,h2:p2`).
    pub endpoints: Vec<String>,
    /// Mutual TLS: CA, client certificate and key, as PEM text.
    pub tls: Option<(String, String, String)>,
}

impl EtcdConfig {
    /// Parse `etcd://host:port[,host:port...]`.
    pub fn parse(url: &str) -> Result<EtcdConfig, String> {
        let Some(rest) = url.strip_prefix("etcd://") else {
            return Err(format!(
                "`{url}` is not an etcd store: write it like etcd://10.0.0.1:2379,10.0.0.2:2379,10.0.0.3:2379"
            ));
        };
        let endpoints: Vec<String> = rest
            .split(',')
            .map(|s| s.trim().trim_end_matches('/').to_owned())
            .collect();
        for e in &endpoints {
            let ok = e
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
            if !ok {
                return Err(format!(
                    "`{e}` in `{url}` is not host:port; write every member like 10.0.0.1:2379"
                ));
            }
        }
        Ok(EtcdConfig { endpoints, tls: None })
    }
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// No member answered: the request may or may not have been applied
    /// (a write that timed out may still commit).
    #[error("no etcd member answered ({0})")]
    Unavailable(String),
    /// A member answered with an error: nothing was applied.
    #[error("etcd refused the request: {0}")]
    Refused(String),
}

impl EtcdError {
    /// Whether trying again later may succeed.
    pub fn transient(&self) -> bool {
        matches!(self, EtcdError::Unavailable(_))
    }
}

/// Whether an answer means "ask another member" rather than "the request
/// is wrong".
fn retry_elsewhere(s: &tonic::Status) -> bool {
    use tonic::Code::*;
    match s.code() {
        Unavailable | DeadlineExceeded | Cancelled | Aborted => true,
        // An overload that passes (not a message over the size limit).
        ResourceExhausted => s.message().contains("too many requests"),
        // etcd reports raft trouble as Unknown with these messages.
        Unknown | Internal => {
            let m = s.message();
            m.contains("no leader")
                || m.contains("leader changed")
                || m.contains("timed out")
                || m.contains("timeout")
                || m.contains("transport")
                || m.contains("connection")
                || m.contains("not capable")
        }
        _ => false,
    }
}

/// A client for one cluster.
pub struct Etcd {
    cfg: EtcdConfig,
    channels: Vec<Channel>,
    /// The member asked first (the last one that answered).
    current: AtomicUsize,
}

impl Etcd {
    /// A client; nothing is dialled until the first request.
    pub fn new(cfg: EtcdConfig) -> Result<Etcd> {
        if cfg.endpoints.is_empty() {
            bail!("an etcd store needs at least one member address");
        }
        let mut channels = Vec::new();
        for e in &cfg.endpoints {
            let scheme = if cfg.tls.is_some() { "https" } else { "http" };
            let mut ep = Endpoint::from_shared(format!("{scheme}://{e}"))
                .with_context(|| format!("`{e}` is not an etcd member address"))?
                .connect_timeout(Duration::from_secs(2))
                .timeout(REQUEST_TIMEOUT)
                .http2_keep_alive_interval(Duration::from_secs(2))
                .keep_alive_timeout(Duration::from_secs(2));
            if let Some((ca, cert, key)) = &cfg.tls {
                let host = e.rsplit_once(':').map_or(e.as_str(), |(h, _)| h);
                ep = ep
                    .tls_config(
                        ClientTlsConfig::new()
                            .ca_certificate(Certificate::from_pem(ca))
                            .identity(Identity::from_pem(cert, key))
                            .domain_name(host.trim_matches(['[', ']'])),
                    )
                    .context("setting up TLS to etcd")?;
            }
            channels.push(ep.connect_lazy());
        }
        Ok(Etcd {
            cfg,
            channels,
            current: AtomicUsize::new(0),
        })
    }

    /// The members, as configured.
    pub fn endpoints(&self) -> &[String] {
        &self.cfg.endpoints
    }

    /// Run `f` against each member in turn, from the last one that
    /// answered, until one answers.
    async fn each<T, F, Fut>(&self, what: &str, f: F) -> Result<T, EtcdError>
    where
        F: Fn(Channel) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let n = self.channels.len();
        let first = self.current.load(Ordering::Relaxed) % n;
        let mut why = Vec::new();
        for i in 0..n {
            let at = (first + i) % n;
            match tokio::time::timeout(REQUEST_TIMEOUT, f(self.channels[at].clone())).await {
                Ok(Ok(v)) => {
                    self.current.store(at, Ordering::Relaxed);
                    return Ok(v);
                }
                // A refusal after a member that may have applied the
                // request went silent does not say that nothing was applied.
                Ok(Err(s)) if !retry_elsewhere(&s) && why.is_empty() => {
                    return Err(EtcdError::Refused(format!("{what}: {}", s.message())));
                }
                Ok(Err(s)) if !retry_elsewhere(&s) => {
                    why.push(format!("{}: {}", self.cfg.endpoints[at], s.message()));
                    break;
                }
                Ok(Err(s)) => why.push(format!("{}: {}", self.cfg.endpoints[at], s.message())),
                Err(_) => why.push(format!(
                    "{}: no answer within {REQUEST_TIMEOUT:?}",
                    self.cfg.endpoints[at]
                )),
            }
        }
        self.current.store((first + 1) % n, Ordering::Relaxed);
        Err(EtcdError::Unavailable(format!("{what}: {}", why.join("; "))))
    }

    fn kv(ch: Channel) -> KvClient<Channel> {
        KvClient::new(ch)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }

    /// A linearizable read of one key.
    pub async fn get(&self, key: &[u8]) -> Result<Option<pb::KeyValue>, EtcdError> {
        let req = pb::RangeRequest {
            key: key.to_vec(),
            ..Default::default()
        };
        let r = self
            .each("reading a key", |ch| {
                let req = req.clone();
                async move { Etcd::kv(ch).range(req).await.map(tonic::Response::into_inner) }
            })
            .await?;
        Ok(r.kvs.into_iter().next())
    }

    /// A range read.
    pub async fn range(&self, req: pb::RangeRequest) -> Result<pb::RangeResponse, EtcdError> {
        self.each("reading keys", |ch| {
            let req = req.clone();
            async move { Etcd::kv(ch).range(req).await.map(tonic::Response::into_inner) }
        })
        .await
    }

    /// Every key and value under `prefix`, in key order, read in pages at
    /// one revision, so that the whole is one consistent view.
    pub async fn scan(&self, prefix: &[u8], f: impl FnMut(pb::KeyValue) -> bool) -> Result<(), EtcdError> {
        self.scan_at(prefix, 0, f).await.map(|_| ())
    }

    /// `scan` as the store was at `revision` (0: now); returns the revision
    /// it read, so that a second scan can read the same moment.
    pub async fn scan_at(
        &self,
        prefix: &[u8],
        at: i64,
        mut f: impl FnMut(pb::KeyValue) -> bool,
    ) -> Result<i64, EtcdError> {
        let end = prefix_end(prefix);
        let mut from = prefix.to_vec();
        let mut revision = at;
        loop {
            let r = self
                .range(pb::RangeRequest {
                    key: from.clone(),
                    range_end: end.clone(),
                    limit: 512,
                    revision,
                    ..Default::default()
                })
                .await?;
            if revision == 0 {
                revision = r.header.as_ref().map_or(0, |h| h.revision);
            }
            let more = r.more;
            let mut last = None;
            for kv in r.kvs {
                last = Some(kv.key.clone());
                if !f(kv) {
                    return Ok(revision);
                }
            }
            match last {
                Some(mut k) if more => {
                    k.push(0);
                    from = k;
                }
                _ => return Ok(revision),
            }
        }
    }

    /// The last key under `prefix` (by key order), if any.
    pub async fn last(&self, prefix: &[u8]) -> Result<Option<pb::KeyValue>, EtcdError> {
        let r = self
            .range(pb::RangeRequest {
                key: prefix.to_vec(),
                range_end: prefix_end(prefix),
                limit: 1,
                sort_order: pb::range_request::SortOrder::Descend as i32,
                sort_target: pb::range_request::SortTarget::Key as i32,
                ..Default::default()
            })
            .await?;
        Ok(r.kvs.into_iter().next())
    }

    /// How many keys there are under `prefix`.
    pub async fn count(&self, prefix: &[u8]) -> Result<u64, EtcdError> {
        let r = self
            .range(pb::RangeRequest {
                key: prefix.to_vec(),
                range_end: prefix_end(prefix),
                count_only: true,
                ..Default::default()
            })
            .await?;
        Ok(u64::try_from(r.count).unwrap_or(0))
    }

    /// A transaction. A transient error means it may have been applied.
    pub async fn txn(&self, req: pb::TxnRequest) -> Result<pb::TxnResponse, EtcdError> {
        self.each("a transaction", |ch| {
            let req = req.clone();
            async move { Etcd::kv(ch).txn(req).await.map(tonic::Response::into_inner) }
        })
        .await
    }

    /// A new lease of `ttl` seconds; returns its id and granted TTL.
    pub async fn grant(&self, ttl: i64) -> Result<(i64, i64), EtcdError> {
        let r = self
            .each("granting a lease", |ch| async move {
                LeaseClient::new(ch)
                    .lease_grant(pb::LeaseGrantRequest { ttl, id: 0 })
                    .await
                    .map(tonic::Response::into_inner)
            })
            .await?;
        if !r.error.is_empty() {
            return Err(EtcdError::Refused(format!("granting a lease: {}", r.error)));
        }
        Ok((r.id, r.ttl))
    }

    /// Refresh a lease once; returns its TTL (0 or less: it is gone).
    pub async fn keep_alive(&self, lease: i64) -> Result<i64, EtcdError> {
        let r = self
            .each("keeping the lease alive", |ch| async move {
                let mut client = LeaseClient::new(ch);
                let req = tokio_stream::once(pb::LeaseKeepAliveRequest { id: lease });
                let mut answers = client.lease_keep_alive(req).await?.into_inner();
                match answers.message().await? {
                    Some(a) => Ok(a),
                    None => Err(tonic::Status::unavailable("the keep-alive stream closed")),
                }
            })
            .await?;
        Ok(r.ttl)
    }

    /// End a lease now (its keys go).
    pub async fn revoke(&self, lease: i64) -> Result<(), EtcdError> {
        self.each("revoking the lease", |ch| async move {
            LeaseClient::new(ch)
                .lease_revoke(pb::LeaseRevokeRequest { id: lease })
                .await
                .map(|_| ())
        })
        .await
    }

    /// Each member's status (or why it did not answer), in configured order.
    pub async fn statuses(&self) -> Vec<(String, Result<pb::StatusResponse, String>)> {
        let mut out = Vec::new();
        for (e, ch) in self.cfg.endpoints.iter().zip(&self.channels) {
            let r = tokio::time::timeout(
                REQUEST_TIMEOUT,
                MaintenanceClient::new(ch.clone()).status(pb::StatusRequest {}),
            )
            .await;
            out.push((
                e.clone(),
                match r {
                    Ok(Ok(s)) => Ok(s.into_inner()),
                    Ok(Err(s)) => Err(s.message().to_owned()),
                    Err(_) => Err(format!("no answer within {REQUEST_TIMEOUT:?}")),
                },
            ));
        }
        out
    }
}

/// The end of the key range of everything that starts with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// A put, as a transaction operation.
pub fn put(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(request_op::Request::RequestPut(pb::PutRequest {
            key: key.into(),
            value: value.into(),
            lease: 0,
        })),
    }
}

/// A delete of one key, as a transaction operation.
pub fn delete(key: impl Into<Vec<u8>>) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(request_op::Request::RequestDeleteRange(pb::DeleteRangeRequest {
            key: key.into(),
            range_end: Vec::new(),
        })),
    }
}

/// A read of one key, as a transaction operation.
pub fn read(key: impl Into<Vec<u8>>) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(request_op::Request::RequestRange(pb::RangeRequest {
            key: key.into(),
            ..Default::default()
        })),
    }
}

/// "The key was last changed at this revision" (0: it does not exist).
pub fn modified_at(key: impl Into<Vec<u8>>, revision: i64) -> pb::Compare {
    pb::Compare {
        result: compare::CompareResult::Equal as i32,
        target: compare::CompareTarget::Mod as i32,
        key: key.into(),
        target_union: Some(compare::TargetUnion::ModRevision(revision)),
    }
}

/// "The key was created at this revision" (0: it does not exist).
pub fn created_at(key: impl Into<Vec<u8>>, revision: i64) -> pb::Compare {
    pb::Compare {
        result: compare::CompareResult::Equal as i32,
        target: compare::CompareTarget::Create as i32,
        key: key.into(),
        target_union: Some(compare::TargetUnion::CreateRevision(revision)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_urls_name_every_member() {
        let c = EtcdConfig::parse("etcd://127.0.0.1:2379,10.0.0.2:2379").expect("parses");
        assert_eq!(c.endpoints, ["127.0.0.1:2379", "10.0.0.2:2379"]);
        let e = EtcdConfig::parse("http://127.0.0.1:2379").expect_err("not etcd://");
        assert!(e.contains("etcd://"), "{e}");
        let e = EtcdConfig::parse("etcd://127.0.0.1").expect_err("no port");
        assert!(e.contains("host:port"), "{e}");
    }

    #[test]
    fn a_prefix_range_ends_after_every_key_that_starts_with_it() {
        assert_eq!(prefix_end(b"/w/audit/"), b"/w/audit0".to_vec());
        assert_eq!(prefix_end(&[b'a', 0xff]), b"b".to_vec());
        assert_eq!(prefix_end(&[0xff]), vec![0]);
    }
}
