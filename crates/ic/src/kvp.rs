//! The KVP (key-value pair exchange) service: read and write the guest's key-value pools.
//!
//! **What it is.** Host requests on IC message type 2 (layout in [`crate::protocol::kvp`]):
//! [`KvpHandle::set`] stores a string in a pool (the Linux daemon writes it to
//! `/var/lib/hyperv/.kvp_pool_<n>`), [`KvpHandle::delete`] removes a key,
//! [`KvpHandle::enumerate`] walks ENUMERATE index 0, 1, ... until the guest answers "no
//! more items" (`HV_S_CONT`), and [`KvpHandle::get`] finds one key by enumerating (Linux's
//! GET operation does not return stored values — see the protocol module). Enumerating
//! [`KvpPool::Auto`] returns what the Linux daemon generates: FullyQualifiedDomainName,
//! IntegrationServicesVersion, NetworkAddressIPv4, NetworkAddressIPv6, OSBuildNumber, OSName,
//! OSMajorVersion, OSMinorVersion, OSVersion, ProcessorArchitecture. IP injection
//! (GET_IP_INFO / SET_IP_INFO) is not offered.
//!
//! The guest side needs `hv_kvp_daemon`: without it Linux does not even answer version
//! negotiation (it waits for the daemon), so requests fail with [`IcError::NotReady`]; if
//! the daemon dies later they time out, or fail with `HV_E_FAIL` when the kernel gives up
//! on it after 30 s. Every request is bounded by [`KvpConfig::timeout`]. A request that
//! timed out may still be carried out by the guest later (Linux handles requests in order
//! once its daemon answers); its late answer is then dropped.
//!
//! **What it talks to.** Its channel through the IC engine; the worker's control socket
//! through [`KvpHandle`].
//!
//! **What it must never do.** Trust the guest's strings (decoded strictly, sizes checked),
//! loop forever on an enumeration (capped at [`KvpConfig::max_items`]), or send strings the
//! Linux guest would silently truncate (rejected up front with [`IcError::InvalidArgument`]).

use std::sync::Arc;
use std::time::Duration;

use crate::framework::{Core, IcVsp, Reply, Service, ServiceSpec, ServiceStatus};
use crate::protocol::kvp::{self as wire, KvpPool, KvpReply, KvpRequest};
use crate::protocol::{
    self, RequestHeader, HV_S_CONT, HV_S_OK, KVP_VERSIONS, MSGTYPE_KVP_EXCHANGE,
};
use crate::{Guid, IcError};

/// The KVP device class.
pub const KVP_CLASS: Guid = Guid::from_str_const("a9a0f4e7-5a45-4d96-b827-8a841e8c03e6");

static SPEC: ServiceSpec = ServiceSpec {
    name: "kvp",
    class_id: KVP_CLASS,
    msg_type: MSGTYPE_KVP_EXCHANGE,
    versions: KVP_VERSIONS,
    hint: " (is hv_kvp_daemon running in the guest?)",
};

/// KVP settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvpConfig {
    /// How long each request waits (for the channel, the slot and the guest's answer).
    pub timeout: Duration,
    /// Most items [`KvpHandle::enumerate`] accepts from one pool.
    pub max_items: usize,
}

impl Default for KvpConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            max_items: 1024,
        }
    }
}

struct Kvp;

impl Service for Kvp {}

/// The KVP service's handle: cheap to clone, usable from any thread. Each call is one or
/// more transactions, serialized with every other request to this service.
#[derive(Clone)]
pub struct KvpHandle {
    core: Arc<Core>,
    config: KvpConfig,
}

impl std::fmt::Debug for KvpHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvpHandle").finish_non_exhaustive()
    }
}

impl KvpHandle {
    fn invalid(e: wire::KvpArgError) -> IcError {
        IcError::InvalidArgument {
            service: SPEC.name,
            reason: e.to_string(),
        }
    }

    fn exchange(&self, req: &KvpRequest<'_>) -> Result<Reply, IcError> {
        let body = wire::build_kvp_body(req).map_err(Self::invalid)?;
        self.core.transact(self.config.timeout, |neg, id| {
            protocol::build_request(
                &RequestHeader {
                    msg_type: MSGTYPE_KVP_EXCHANGE,
                    framework: neg.framework,
                    message: neg.message,
                    transaction_id: id,
                },
                &body,
            )
        })
    }

    fn parse(reply: &Reply, req: &KvpRequest<'_>) -> Result<KvpReply, IcError> {
        wire::parse_kvp_reply(&reply.body, req.operation(), req.pool().number()).map_err(|error| {
            IcError::BadResponse {
                service: SPEC.name,
                error,
            }
        })
    }

    fn refused(status: u32) -> IcError {
        IcError::Refused {
            service: SPEC.name,
            status,
        }
    }

    /// Store `value` under `key` in `pool`. Keys are 1 to 254 UTF-16 units (at most 511
    /// UTF-8 bytes), values at most 1022 units (2047 UTF-8 bytes), neither containing NUL:
    /// the limits within which a Linux guest stores and returns the strings unchanged.
    pub fn set(&self, pool: KvpPool, key: &str, value: &str) -> Result<(), IcError> {
        let req = KvpRequest::Set { pool, key, value };
        let reply = self.exchange(&req)?;
        match reply.status {
            HV_S_OK => Self::parse(&reply, &req).map(|_| ()),
            s => Err(Self::refused(s)),
        }
    }

    /// Delete `key` from `pool`; `Ok(false)` if the guest did not have it.
    pub fn delete(&self, pool: KvpPool, key: &str) -> Result<bool, IcError> {
        let req = KvpRequest::Delete { pool, key };
        let reply = self.exchange(&req)?;
        match reply.status {
            HV_S_OK => Self::parse(&reply, &req).map(|_| true),
            HV_S_CONT => Ok(false),
            s => Err(Self::refused(s)),
        }
    }

    /// The item at `index` of `pool`, or `None` past the end.
    pub fn item(&self, pool: KvpPool, index: u32) -> Result<Option<(String, String)>, IcError> {
        let req = KvpRequest::Enumerate { pool, index };
        let reply = self.exchange(&req)?;
        match reply.status {
            HV_S_OK => wire::parse_enumerate_reply(&reply.body, pool.number())
                .map(Some)
                .map_err(|error| IcError::BadResponse {
                    service: SPEC.name,
                    error,
                }),
            HV_S_CONT => Ok(None),
            s => Err(Self::refused(s)),
        }
    }

    /// Every item of `pool`, in the guest's order (at most [`KvpConfig::max_items`]).
    pub fn enumerate(&self, pool: KvpPool) -> Result<Vec<(String, String)>, IcError> {
        let mut items = Vec::new();
        for index in 0u32.. {
            match self.item(pool, index)? {
                Some(kv) => {
                    if items.len() >= self.config.max_items {
                        return Err(IcError::TooManyItems {
                            service: SPEC.name,
                            limit: self.config.max_items,
                        });
                    }
                    items.push(kv);
                }
                None => break,
            }
        }
        Ok(items)
    }

    /// The value of `key` in `pool` (found by enumerating), or `None`.
    pub fn get(&self, pool: KvpPool, key: &str) -> Result<Option<String>, IcError> {
        wire::check_key(key).map_err(Self::invalid)?;
        for index in 0u32.. {
            if index as usize > self.config.max_items {
                return Err(IcError::TooManyItems {
                    service: SPEC.name,
                    limit: self.config.max_items,
                });
            }
            match self.item(pool, index)? {
                Some((k, v)) if k == key => return Ok(Some(v)),
                Some(_) => {}
                None => return Ok(None),
            }
        }
        Ok(None)
    }

    /// The channel's status.
    pub fn status(&self) -> ServiceStatus {
        self.core.status()
    }
}

/// A KVP VSP and its handle; the instance id derives from `seed`.
pub fn new(seed: &[u8], config: KvpConfig) -> (IcVsp, KvpHandle) {
    let core = Core::new(&SPEC);
    let vsp = IcVsp::new(
        core.clone(),
        Arc::new(Kvp),
        crate::instance_id(seed, KVP_CLASS),
    );
    (vsp, KvpHandle { core, config })
}
