//! The shared store of cluster mode: a Redis Cluster that holds every node's flushed counts.
//!
//! This module owns the key layout, the Redis Functions that apply a flush idempotently, and
//! the few commands the nodes send. It knows nothing of workers or threads: a [`RedisStore`]
//! is one connection, used by one thread. It is never on the per-datagram path.
//!
//! Key layout (`P` is `--redis-prefix`, `E` the reset epoch, `SHA` the app's 64 hex digits;
//! the braces are Redis's hash tag, so one app's keys live in one slot):
//!
//! - `P:epoch`: the reset epoch, a counter that `DELETE /events` increments.
//! - `P:resets`: a stream of per-app resets (`DELETE /events/{sha}`), capped in length.
//! - `P:node:ID:incarnation`: a counter each start of node `ID` increments.
//! - `P:nodes`: hash of node id to what it last acknowledged (epoch, newest reset, when by the
//!   store's clock, its flush interval), so that a reset can wait for every live node.
//! - `P:eE:{SHA}:ips`: hash of IP (4 bytes, big-endian) to events.
//! - `P:eE:{SHA}:meta`: hash of `n` (events), `t` (IPs were dropped at the cap) and `r` (the
//!   reset that last cleared the app).
//! - `P:seq:{TAG}:ID`: the last flush of node `ID` applied to the slot of `TAG`, a short tag
//!   chosen per slot (one key per node and slot, whatever the number of apps).

use std::fmt;
use std::time::{Duration, Instant};

use std::collections::HashMap;

use redis::io::tcp::TcpSettings;
use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo, RedisError, Value};

use crate::store::{Deltas, Partial};
use crate::wire::AppKey;

/// The Redis Functions library. `ipevents_apply_v1` applies one node's flush for the apps of
/// one slot, atomically, unless the slot already has that flush (a retry); it refuses the
/// share of an app reset after the flush was taken (a stale write). `ipevents_reset_app_v1`
/// clears one app and leaves the reset's id behind, so that such stale writes can be told
/// apart. Keeping the node's last flush per slot, not per app, keeps the store's memory per
/// app independent of how many nodes saw the app.
const FUNCTIONS: &str = r#"#!lua name=ipevents_v1
-- Seqs and reset ids are fixed-width decimal strings, so that they compare as strings.

-- One node's flush for the apps of one slot, applied whole or not at all.
-- keys: the node's seq key for the slot, then each app's IP hash and meta hash.
-- args: flush seq, resets seen, max IPs, then per app: events, truncated (0 or 1), IP count,
-- then that many IP, events pairs.
-- Returns {apps applied, apps refused as reset after the flush was taken, pairs applied}, or
-- {-1, 0, 0} when the slot already has this flush (a retry).
local function apply(keys, args)
  local seq, seen, max_ips = args[1], args[2], tonumber(args[3])
  local applied = redis.call('GET', keys[1])
  if applied and applied >= seq then
    return {-1, 0, 0}
  end
  local done, stale, pairs = 0, 0, 0
  local a = 4
  for k = 2, #keys, 2 do
    local ips, meta = keys[k], keys[k + 1]
    local events, truncated, count = args[a], args[a + 1] == '1', tonumber(args[a + 2])
    local first, last = a + 3, a + 2 + 2 * count
    a = last + 1
    local reset = redis.call('HGET', meta, 'r')
    if reset and reset > seen then
      stale = stale + 1
    else
      redis.call('HINCRBY', meta, 'n', events)
      local stored = redis.call('HLEN', ips)
      if stored + count <= max_ips then
        for i = first, last, 2 do
          redis.call('HINCRBY', ips, args[i], args[i + 1])
        end
      else
        for i = first, last, 2 do
          if redis.call('HEXISTS', ips, args[i]) == 1 then
            redis.call('HINCRBY', ips, args[i], args[i + 1])
          elseif stored < max_ips then
            redis.call('HSET', ips, args[i], args[i + 1])
            stored = stored + 1
          else
            truncated = true
          end
        end
      end
      if truncated then
        redis.call('HSET', meta, 't', '1')
      end
      done = done + 1
      pairs = pairs + count
    end
  end
  redis.call('SET', keys[1], seq)
  return {done, stale, pairs}
end

-- keys: the app's IP hash, the app's meta hash. args: the reset's id.
local function reset_app(keys, args)
  redis.call('UNLINK', keys[1])
  redis.call('DEL', keys[2])
  redis.call('HSET', keys[2], 'r', args[1])
  return 1
end

-- keys: the nodes hash. args: node, epoch, newest reset applied, flush interval in ms.
-- Records what the node has applied, stamped with the server's clock; returns that time in ms.
local function acknowledge(keys, args)
  local time = redis.call('TIME')
  local now_ms = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
  redis.call('HSET', keys[1], args[1], args[2] .. '|' .. args[3] .. '|' .. now_ms .. '|' .. args[4])
  return now_ms
end

redis.register_function('ipevents_apply_v1', apply)
redis.register_function('ipevents_reset_app_v1', reset_app)
redis.register_function('ipevents_acknowledge_v1', acknowledge)
"#;

/// How many (app, ip) pairs one round of a flush carries at most (one slot's apps are never
/// split), sent as one pipeline per primary. A primary runs a round's functions back to back,
/// so a query's read that arrives behind them waits for them: about 2 µs a pair measured,
/// some 2 ms for a round here.
const PAIRS_PER_ROUND: usize = 2_048;

/// How many per-app resets the stream keeps (about 100 bytes each): a node that was away for
/// more per-app resets than this misses the oldest of them.
const RESETS_KEPT: usize = 100_000;

/// The position of a per-app reset in the resets stream: a stream id, `ms-seq`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct ResetId {
    pub ms: u64,
    pub seq: u64,
}

impl ResetId {
    fn parse(id: &str) -> Option<ResetId> {
        let (ms, seq) = id.split_once('-')?;
        Some(ResetId {
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }

    /// The fixed-width form the functions compare as strings.
    fn padded(self) -> String {
        format!("{:020}-{:020}", self.ms, self.seq)
    }
}

impl fmt::Display for ResetId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// A flush's place in its node's order: the node's incarnation (one per start), then the
/// flush's number within it. Written fixed-width, so that the functions compare strings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct FlushSeq {
    pub incarnation: u64,
    pub flush: u64,
}

impl FlushSeq {
    fn padded(self) -> String {
        format!("{:020}.{:020}", self.incarnation, self.flush)
    }
}

/// What changed in the store since a node last looked: a newer epoch, and per-app resets.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub epoch: u64,
    /// Per-app resets after the one the node last saw, oldest first, with their epochs.
    pub app_resets: Vec<(ResetId, AppKey, u64)>,
}

/// One app as the store holds it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoredApp {
    pub partial: Partial,
    /// The last flush of this node applied to the app's slot.
    pub applied: Option<String>,
}

impl StoredApp {
    /// Whether this node's flush `seq` is already counted in the app.
    pub fn includes(&self, seq: FlushSeq) -> bool {
        self.applied.as_deref() >= Some(seq.padded().as_str())
    }
}

/// What one node last told the others it has applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeAck {
    pub node: String,
    pub epoch: u64,
    pub resets_seen: ResetId,
    /// When it said so, by the store's clock.
    pub at_ms: u64,
    pub flush_interval_ms: u64,
}

impl NodeAck {
    fn parse(node: String, value: &str) -> Option<NodeAck> {
        let mut fields = value.split('|');
        let ack = NodeAck {
            node,
            epoch: fields.next()?.parse().ok()?,
            resets_seen: ResetId::parse(fields.next()?)?,
            at_ms: fields.next()?.parse().ok()?,
            flush_interval_ms: fields.next()?.parse().ok()?,
        };
        Some(ack)
    }

    /// Whether the node still flushes: it acknowledges at every flush, so one that has not for
    /// three of its intervals and a second is taken for gone.
    pub fn live(&self, now_ms: u64) -> bool {
        now_ms.saturating_sub(self.at_ms) <= 3 * self.flush_interval_ms + 1000
    }

    /// Whether the node has applied the reset that made `epoch` and `reset`.
    pub fn has_applied(&self, epoch: u64, reset: ResetId) -> bool {
        self.epoch > epoch || (self.epoch == epoch && self.resets_seen >= reset)
    }
}

/// What one write of a flush did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlushOutcome {
    pub apps: u64,
    pub pairs: u64,
    /// Apps the store had already taken this flush for (a retry after an unknown outcome).
    pub duplicate_apps: u64,
    /// Apps reset after the flush was taken, whose share was refused.
    pub stale_apps: u64,
}

/// A failed store operation, with the kind used as the `kind` label of the error counters.
#[derive(Debug)]
pub struct StoreError {
    pub kind: StoreErrorKind,
    pub message: String,
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

labelled_enum! {
    /// Why a store operation failed: the `kind` label of the store's error counters.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum StoreErrorKind {
        Timeout => "timeout",
        Connection => "connection",
        Cluster => "cluster",
        Refused => "refused",
    }
}

impl StoreError {
    fn from_redis(what: &str, error: &RedisError) -> StoreError {
        let kind = if error.is_timeout() {
            StoreErrorKind::Timeout
        } else if error.is_io_error()
            || error.is_connection_dropped()
            || error.is_connection_refusal()
        {
            StoreErrorKind::Connection
        } else if error.is_cluster_error() {
            StoreErrorKind::Cluster
        } else {
            StoreErrorKind::Refused
        };
        StoreError {
            kind,
            message: format!("redis cluster: {what}: {}", describe(error)),
        }
    }
}

/// A RedisError's text without anything that could carry a password.
fn describe(error: &RedisError) -> String {
    let text = error.to_string();
    match text.find("redis://") {
        Some(at) => format!("{}<address>", &text[..at]),
        None => text,
    }
}

/// How to reach the cluster, from the command line.
#[derive(Clone, Debug)]
pub struct StoreSettings {
    /// Seed nodes, `redis://[:PASSWORD@]HOST:PORT`.
    pub seeds: Vec<String>,
    /// A password for every node, when the seeds do not carry one.
    pub password: Option<String>,
    pub prefix: String,
    pub node_id: String,
    /// The bound on each command's round trip and on each connection attempt.
    pub timeout: Duration,
}

impl StoreSettings {
    /// Checks the flags' syntax; the error is one line for the operator.
    pub fn validate(&self) -> Result<(), String> {
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 128
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        };
        if !name_ok(&self.prefix) {
            return Err(format!(
                "--redis-prefix {:?}: use 1 to 128 letters, digits, '-', '_' or '.'",
                self.prefix
            ));
        }
        if !name_ok(&self.node_id) {
            return Err(format!(
                "--node-id {:?}: use 1 to 128 letters, digits, '-', '_' or '.'",
                self.node_id
            ));
        }
        for seed in &self.seeds {
            self.connection_info(seed)?;
        }
        Ok(())
    }

    fn connection_info(&self, seed: &str) -> Result<ConnectionInfo, String> {
        let info = seed
            .into_connection_info()
            .ok()
            .filter(|info| matches!(info.addr(), ConnectionAddr::Tcp(..)))
            .ok_or_else(|| format!("--redis-cluster: {} is not redis://HOST:PORT", redact(seed)))?;
        Ok(match &self.password {
            Some(password) if info.redis_settings().password().is_none() => {
                let redis = info.redis_settings().clone().set_password(password);
                info.set_redis_settings(redis)
            }
            _ => info,
        })
    }

    /// The seeds as `HOST:PORT`, for messages.
    pub fn seeds_display(&self) -> String {
        self.seeds
            .iter()
            .map(|s| redact(s))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Whether a seed URL carries a password, read as the client reads the URL.
pub fn seed_has_password(seed: &str) -> bool {
    seed.into_connection_info()
        .is_ok_and(|info| info.redis_settings().password().is_some())
}

/// A seed URL without its credentials.
fn redact(seed: &str) -> String {
    let rest = seed.strip_prefix("redis://").unwrap_or(seed);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    format!("redis://{}", rest.trim_end_matches('/'))
}

/// Names of one deployment's keys.
#[derive(Clone, Debug)]
struct Keys {
    prefix: String,
}

impl Keys {
    fn epoch(&self) -> String {
        format!("{}:epoch", self.prefix)
    }

    fn resets(&self) -> String {
        format!("{}:resets", self.prefix)
    }

    fn incarnation(&self, node: &str) -> String {
        format!("{}:node:{node}:incarnation", self.prefix)
    }

    /// The key of node `node`'s last flush applied to `slot`.
    fn seq(&self, slot: u16, node: &str) -> String {
        format!("{}:seq:{{{}}}:{node}", self.prefix, slot_tag(slot))
    }

    fn nodes(&self) -> String {
        format!("{}:nodes", self.prefix)
    }

    fn probe(&self, node: &str) -> String {
        format!("{}:probe:{node}", self.prefix)
    }

    fn app(&self, epoch: u64, app: &AppKey) -> (String, String) {
        let base = format!("{}:e{epoch}:{{{}}}", self.prefix, app.to_hex());
        (format!("{base}:ips"), format!("{base}:meta"))
    }

    /// The pattern of every app key of every epoch.
    fn app_pattern(&self) -> String {
        format!("{}:e*", self.prefix)
    }

    /// The epoch of an app key, `None` for other keys.
    fn epoch_of(&self, key: &[u8]) -> Option<u64> {
        let rest = key
            .strip_prefix(self.prefix.as_bytes())?
            .strip_prefix(b":e")?;
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        if rest.get(digits) != Some(&b':') {
            return None;
        }
        std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()
    }
}

/// The hash slot of a key, as Redis Cluster computes it: CRC16 of the hash tag (the text
/// between the first `{` and the next `}`, when not empty) or else of the whole key.
fn slot_of(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        let close = rest.iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    crc16::State::<crc16::XMODEM>::calculate(tagged.unwrap_or(key)) % 16384
}

/// A short string that hashes to `slot`: the first of `0`, `1`, `2`, ... (in base 36) that does.
/// Every node computes the same table.
fn slot_tag(slot: u16) -> &'static str {
    static TAGS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    let tags = TAGS.get_or_init(|| {
        let mut tags = vec![String::new(); 16384];
        let mut missing = tags.len();
        let mut n: u64 = 0;
        while missing > 0 {
            let tag = base36(n);
            let slot = usize::from(slot_of(tag.as_bytes()));
            if tags[slot].is_empty() {
                tags[slot] = tag;
                missing -= 1;
            }
            n += 1;
        }
        tags
    });
    &tags[usize::from(slot)]
}

fn base36(mut n: u64) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut digits = Vec::new();
    loop {
        digits.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    digits.reverse();
    String::from_utf8(digits).expect("ASCII digits")
}

/// Which primary serves which slot.
#[derive(Debug, Default)]
struct SlotMap {
    /// (first slot, last slot, index into `addrs`), sorted by first slot.
    ranges: Vec<(u16, u16, usize)>,
    addrs: Vec<(String, u16)>,
}

impl SlotMap {
    fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The primary of a slot. A slot with no primary maps to the first one, which answers
    /// with a redirection or an error.
    fn primary_of(&self, slot: u16) -> usize {
        let at = self.ranges.partition_point(|&(first, _, _)| first <= slot);
        match at.checked_sub(1).map(|i| self.ranges[i]) {
            Some((_, last, primary)) if slot <= last => primary,
            _ => self.ranges[0].2,
        }
    }

    /// A CLUSTER SLOTS reply: `[[first, last, [host, port, id, ...], replicas...], ...]`. A
    /// node that reports no host is reached at `fallback_host`.
    fn parse(value: &Value, fallback_host: &str) -> SlotMap {
        let mut map = SlotMap::default();
        let Value::Array(entries) = value else {
            return map;
        };
        for entry in entries {
            let Value::Array(fields) = entry else {
                continue;
            };
            let (Some(Value::Int(first)), Some(Value::Int(last)), Some(Value::Array(node))) =
                (fields.first(), fields.get(1), fields.get(2))
            else {
                continue;
            };
            let host: Option<String> = node
                .first()
                .and_then(|v| redis::from_redis_value(v.clone()).ok());
            let host = match host {
                Some(host) if !host.is_empty() && host != "?" => host,
                _ => fallback_host.to_owned(),
            };
            let port = match node.get(1) {
                Some(Value::Int(port)) => u16::try_from(*port).ok(),
                _ => None,
            };
            let (Some(port), Ok(first), Ok(last)) =
                (port, u16::try_from(*first), u16::try_from(*last))
            else {
                continue;
            };
            let addr = (host, port);
            let primary = match map.addrs.iter().position(|a| *a == addr) {
                Some(at) => at,
                None => {
                    map.addrs.push(addr);
                    map.addrs.len() - 1
                }
            };
            map.ranges.push((first, last, primary));
        }
        map.ranges.sort_unstable();
        map
    }
}

/// The answer to one command of a batch: a value, or the error the server gave (a
/// redirection, a refusal), which does not break the connection.
type Reply = Result<Value, RedisError>;

/// One thread's way to the cluster: a slot map and a plain connection to each primary, every
/// read and write bounded by the timeout.
///
/// It routes by itself instead of using the redis crate's cluster client, whose connections
/// send READONLY with no timeout set when they connect (a SIGSTOPped node then blocks the
/// caller until it resumes), and whose pipelines wait out the read timeout once per command
/// on a node that does not answer. Here a batch is sent to every primary it needs before any
/// answer is read, and a primary that does not answer costs one timeout.
pub struct RedisStore {
    settings: StoreSettings,
    keys: Keys,
    /// Empty after a redirection or a broken connection: the next batch learns it again.
    slots: SlotMap,
    connections: HashMap<(String, u16), redis::Connection>,
    /// A flush met a primary without the functions: load them before the retry.
    functions_missing: bool,
    /// The seeds' and every primary's addresses seen, to learn the slot map from.
    known: Vec<(String, u16)>,
}

impl RedisStore {
    /// A store for `settings`; it connects at its first command.
    pub fn connect(settings: &StoreSettings) -> Result<RedisStore, StoreError> {
        let mut known = Vec::new();
        for seed in &settings.seeds {
            let info = settings
                .connection_info(seed)
                .map_err(|message| StoreError {
                    kind: StoreErrorKind::Refused,
                    message,
                })?;
            if let ConnectionAddr::Tcp(host, port) = info.addr() {
                known.push((host.clone(), *port));
            }
        }
        Ok(RedisStore {
            settings: settings.clone(),
            keys: Keys {
                prefix: settings.prefix.clone(),
            },
            slots: SlotMap::default(),
            connections: HashMap::new(),
            functions_missing: false,
            known,
        })
    }

    /// Learns which primary serves which slot from the first known node that answers, within
    /// two timeouts in all.
    fn refresh_slots(&mut self) -> Result<(), StoreError> {
        let deadline = Instant::now() + 2 * self.settings.timeout;
        let mut last_error = None;
        for addr in self.known.clone() {
            if Instant::now() >= deadline && last_error.is_some() {
                break;
            }
            let reply = self.connection(&addr).and_then(|connection| {
                redis::cmd("CLUSTER")
                    .arg("SLOTS")
                    .query::<Value>(connection)
                    .map_err(|e| StoreError::from_redis("read the slot map", &e))
            });
            match reply {
                Ok(value) => {
                    let slots = SlotMap::parse(&value, &addr.0);
                    if slots.is_empty() {
                        last_error = Some(StoreError {
                            kind: StoreErrorKind::Cluster,
                            message: format!(
                                "redis cluster: {}:{} serves no slots",
                                addr.0, addr.1
                            ),
                        });
                        continue;
                    }
                    for primary in &slots.addrs {
                        if !self.known.contains(primary) {
                            self.known.push(primary.clone());
                        }
                    }
                    self.slots = slots;
                    return Ok(());
                }
                Err(e) => {
                    self.connections.remove(&addr);
                    last_error = Some(e);
                }
            }
        }
        Err(last_error.unwrap_or_else(|| StoreError {
            kind: StoreErrorKind::Connection,
            message: "redis cluster: no node to ask".into(),
        }))
    }

    /// The connection to `addr`, made when there is none, with the timeout on every read and
    /// write.
    fn connection(&mut self, addr: &(String, u16)) -> Result<&mut redis::Connection, StoreError> {
        if !self.connections.contains_key(addr) {
            let connection = self.connect_node(addr)?;
            self.connections.insert(addr.clone(), connection);
        }
        Ok(self.connections.get_mut(addr).expect("inserted above"))
    }

    fn connect_node(&self, (host, port): &(String, u16)) -> Result<redis::Connection, StoreError> {
        let info = self
            .settings
            .connection_info(&self.settings.seeds[0])
            .map_err(|message| StoreError {
                kind: StoreErrorKind::Refused,
                message,
            })?
            .set_addr(ConnectionAddr::Tcp(host.clone(), *port))
            // A batch is a write followed by a read: without TCP_NODELAY, Nagle's algorithm may
            // hold a small write back until the previous one is acknowledged.
            .set_tcp_settings(TcpSettings::default().set_nodelay(true));
        let what = format!("connect to {host}:{port}");
        let client = redis::Client::open(info).map_err(|e| StoreError::from_redis(&what, &e))?;
        let connection = client
            .get_connection_with_timeout(self.settings.timeout)
            .map_err(|e| StoreError::from_redis(&what, &e))?;
        connection
            .set_read_timeout(Some(self.settings.timeout))
            .and_then(|()| connection.set_write_timeout(Some(self.settings.timeout)))
            .map_err(|e| StoreError::from_redis(&what, &e))?;
        Ok(connection)
    }

    /// Runs commands, each on the primary of its key's slot: one pipeline per primary, all
    /// sent before any answer is read. Returns each command's reply in order; fails whole when
    /// a primary cannot be reached or does not answer in time (its connection is dropped, and
    /// the slot map is learnt again at the next batch).
    fn batch(
        &mut self,
        what: &str,
        commands: &[(u16, redis::Cmd)],
    ) -> Result<Vec<Reply>, StoreError> {
        if self.slots.is_empty() {
            self.refresh_slots()?;
        }
        let mut groups: Vec<(usize, Vec<usize>)> = Vec::new();
        for (index, (slot, _)) in commands.iter().enumerate() {
            let primary = self.slots.primary_of(*slot);
            match groups.iter_mut().find(|(p, _)| *p == primary) {
                Some((_, indexes)) => indexes.push(index),
                None => groups.push((primary, vec![index])),
            }
        }
        let mut replies: Vec<Option<Reply>> = (0..commands.len()).map(|_| None).collect();
        let mut failure: Option<StoreError> = None;
        let mut sent = Vec::with_capacity(groups.len());
        for (primary, indexes) in &groups {
            let addr = self.slots.addrs[*primary].clone();
            let mut pipe = redis::pipe();
            for &index in indexes {
                pipe.add_command(commands[index].1.clone());
            }
            let result = self.connection(&addr).and_then(|connection| {
                connection
                    .send_packed_command(&pipe.get_packed_pipeline())
                    .map_err(|e| StoreError::from_redis(what, &e))
            });
            match result {
                Ok(()) => sent.push((addr, indexes)),
                Err(e) => {
                    self.connections.remove(&addr);
                    failure.get_or_insert(e);
                }
            }
        }
        for (addr, indexes) in sent {
            for &index in indexes {
                let connection = self.connections.get_mut(&addr).expect("sent on it");
                let reply = connection.recv_response().and_then(|value| match value {
                    Value::ServerError(error) => Err(error.into()),
                    value => Ok(value),
                });
                match reply {
                    Err(e) if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() => {
                        // The rest of this primary's answers are lost with the connection.
                        self.connections.remove(&addr);
                        failure.get_or_insert(StoreError::from_redis(what, &e));
                        break;
                    }
                    Err(e) if e.is_cluster_error() => {
                        // MOVED, ASK, CLUSTERDOWN, TRYAGAIN: the map is out of date, or the
                        // cluster is not whole right now.
                        failure.get_or_insert(StoreError::from_redis(what, &e));
                        replies[index] = Some(Err(e));
                    }
                    reply => replies[index] = Some(reply),
                }
            }
        }
        if let Some(failure) = failure {
            self.slots = SlotMap::default();
            return Err(failure);
        }
        Ok(replies
            .into_iter()
            .map(|reply| reply.expect("every command answered"))
            .collect())
    }

    /// One command on the primary of `key`'s slot.
    fn one<T: redis::FromRedisValue>(
        &mut self,
        what: &str,
        key: &str,
        command: redis::Cmd,
    ) -> Result<T, StoreError> {
        let reply = self
            .batch(what, &[(slot_of(key.as_bytes()), command)])?
            .pop()
            .expect("one command, one reply");
        let value = reply.map_err(|e| StoreError::from_redis(what, &e))?;
        decode(what, value)
    }

    /// Checks at start that the cluster is whole and takes writes, and loads the functions
    /// on every primary. The error names the address and the problem.
    pub fn check(&mut self) -> Result<(), String> {
        let mut healthy = false;
        let mut problems = Vec::new();
        for seed in &self.settings.seeds {
            match cluster_state(&self.settings, seed) {
                Ok(state) if state == "ok" => {
                    healthy = true;
                    break;
                }
                Ok(state) => problems.push(format!("{}: cluster_state:{state}", redact(seed))),
                Err(e) => problems.push(format!("{}: {e}", redact(seed))),
            }
        }
        if !healthy {
            return Err(format!("redis cluster {}", problems.join("; ")));
        }
        let seeds = self.settings.seeds_display();
        let fail = |e: StoreError| {
            format!(
                "redis cluster {seeds}: {}",
                e.message.trim_start_matches("redis cluster: ")
            )
        };
        let probe = self.keys.probe(&self.settings.node_id);
        let mut set = redis::cmd("SET");
        set.arg(&probe).arg("1").arg("PX").arg(60_000);
        let mut get = redis::cmd("GET");
        get.arg(&probe);
        let slot = slot_of(probe.as_bytes());
        let replies = self
            .batch("a test write", &[(slot, set), (slot, get)])
            .map_err(fail)?;
        let written: Option<String> = replies
            .into_iter()
            .nth(1)
            .and_then(|reply| reply.ok())
            .and_then(|value| redis::from_redis_value(value).ok());
        if written.as_deref() != Some("1") {
            return Err(format!(
                "redis cluster {}: a test write did not read back",
                self.settings.seeds_display()
            ));
        }
        self.load_functions().map_err(fail)
    }

    /// Loads the functions on every primary.
    fn load_functions(&mut self) -> Result<(), StoreError> {
        if self.slots.is_empty() {
            self.refresh_slots()?;
        }
        for addr in self.slots.addrs.clone() {
            let reply = self.connection(&addr).and_then(|connection| {
                redis::cmd("FUNCTION")
                    .arg("LOAD")
                    .arg("REPLACE")
                    .arg(FUNCTIONS)
                    .query::<Value>(connection)
                    .map_err(|e| StoreError::from_redis("load the functions", &e))
            });
            if let Err(e) = reply {
                self.connections.remove(&addr);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Starts a new incarnation of this node: every flush it sends is ordered after those of
    /// any earlier run with the same `--node-id`.
    pub fn next_incarnation(&mut self) -> Result<u64, StoreError> {
        let key = self.keys.incarnation(&self.settings.node_id);
        let mut command = redis::cmd("INCR");
        command.arg(&key);
        self.one("start an incarnation", &key, command)
    }

    /// The current epoch and the newest per-app reset, for a node that starts.
    pub fn position(&mut self) -> Result<(u64, ResetId), StoreError> {
        let (epoch_key, resets_key) = (self.keys.epoch(), self.keys.resets());
        let mut get = redis::cmd("GET");
        get.arg(&epoch_key);
        let mut newest = redis::cmd("XREVRANGE");
        newest
            .arg(&resets_key)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1);
        let commands = [
            (slot_of(epoch_key.as_bytes()), get),
            (slot_of(resets_key.as_bytes()), newest),
        ];
        let mut replies = self.batch("read the epoch", &commands)?.into_iter();
        let fail = |e: RedisError| StoreError::from_redis("read the epoch", &e);
        let epoch = replies.next().expect("two replies").map_err(fail)?;
        let epoch: Option<u64> = decode("read the epoch", epoch)?;
        let newest = replies.next().expect("two replies").map_err(fail)?;
        let newest = stream_entries(&newest)
            .into_iter()
            .map(|(id, _)| id)
            .next()
            .unwrap_or_default();
        Ok((epoch.unwrap_or(0), newest))
    }

    /// What changed since `seen`, and when `app` is given, that app as stored in `epoch`: one
    /// round trip.
    pub fn read(
        &mut self,
        seen: ResetId,
        epoch: u64,
        app: Option<&AppKey>,
    ) -> Result<(Changes, Option<StoredApp>), StoreError> {
        let (epoch_key, resets_key) = (self.keys.epoch(), self.keys.resets());
        let mut get = redis::cmd("GET");
        get.arg(&epoch_key);
        let mut resets = redis::cmd("XRANGE");
        resets
            .arg(&resets_key)
            .arg(format!("({seen}"))
            .arg("+")
            .arg("COUNT")
            .arg(1000);
        let mut commands = vec![
            (slot_of(epoch_key.as_bytes()), get),
            (slot_of(resets_key.as_bytes()), resets),
        ];
        if let Some(app) = app {
            let (ips, meta) = self.keys.app(epoch, app);
            let slot = slot_of(ips.as_bytes());
            let mut read_ips = redis::cmd("HGETALL");
            read_ips.arg(ips);
            let mut read_meta = redis::cmd("HGETALL");
            read_meta.arg(meta);
            let mut read_seq = redis::cmd("GET");
            read_seq.arg(self.keys.seq(slot, &self.settings.node_id));
            commands.push((slot, read_ips));
            commands.push((slot, read_meta));
            commands.push((slot, read_seq));
        }
        let fail = |e: RedisError| StoreError::from_redis("read", &e);
        let mut values = Vec::with_capacity(commands.len());
        for reply in self.batch("read", &commands)? {
            values.push(reply.map_err(fail)?);
        }
        let mut values = values.into_iter();
        let epoch_now: Option<u64> = decode("read", values.next().expect("a reply per command"))?;
        let entries = stream_entries(&values.next().expect("a reply per command"));
        // A node more than a page behind gets the rest with its next read.
        let mut changes = Changes {
            epoch: epoch_now.unwrap_or(0),
            app_resets: Vec::new(),
        };
        for (id, fields) in entries {
            let app = fields
                .iter()
                .find(|(k, _)| k == "app")
                .and_then(|(_, v)| AppKey::from_hex(v.as_bytes()));
            let reset_epoch = fields
                .iter()
                .find(|(k, _)| k == "epoch")
                .and_then(|(_, v)| v.parse().ok());
            if let (Some(app), Some(reset_epoch)) = (app, reset_epoch) {
                changes.app_resets.push((id, app, reset_epoch));
            }
        }
        let stored = match app {
            None => None,
            Some(_) => {
                let ips: Vec<(Vec<u8>, u64)> =
                    decode("read", values.next().expect("a reply per command"))?;
                let meta: Vec<(String, String)> =
                    decode("read", values.next().expect("a reply per command"))?;
                let applied: Option<String> =
                    decode("read", values.next().expect("a reply per command"))?;
                Some(stored_app(ips, meta, applied))
            }
        };
        Ok((changes, stored))
    }

    /// Writes one flush: for each app, its events and IPs, applied at most once however
    /// often the flush is retried, and refused for apps reset after `resets_seen`. The apps of
    /// one slot go in one function call, applied whole or not at all; a failed write may have
    /// applied some slots, and the retry applies the rest.
    pub fn apply(
        &mut self,
        epoch: u64,
        seq: FlushSeq,
        resets_seen: ResetId,
        deltas: &Deltas,
        max_ips_per_app: usize,
    ) -> Result<FlushOutcome, StoreError> {
        let node = self.settings.node_id.clone();
        let seq = seq.padded();
        let seen = resets_seen.padded();
        let mut by_slot: HashMap<u16, Vec<(&AppKey, &Partial)>> = HashMap::new();
        for (app, partial) in deltas.iter() {
            by_slot
                .entry(slot_of(app.to_hex().as_bytes()))
                .or_default()
                .push((app, partial));
        }
        let mut outcome = FlushOutcome::default();
        let mut groups: Vec<(u16, Vec<(&AppKey, &Partial)>)> = by_slot.into_iter().collect();
        while !groups.is_empty() {
            // One round: whole slots, up to PAIRS_PER_ROUND pairs (at least one slot).
            let mut pairs = 0;
            let mut take = 0;
            for (_, apps) in groups.iter().rev() {
                let group_pairs: usize = apps.iter().map(|(_, p)| p.ips.len().max(1)).sum();
                if take > 0 && pairs + group_pairs > PAIRS_PER_ROUND {
                    break;
                }
                pairs += group_pairs;
                take += 1;
            }
            let round = groups.split_off(groups.len() - take);
            let commands: Vec<(u16, redis::Cmd)> = round
                .iter()
                .map(|(slot, apps)| {
                    let mut command = redis::cmd("FCALL");
                    command
                        .arg("ipevents_apply_v1")
                        .arg(1 + 2 * apps.len())
                        .arg(self.keys.seq(*slot, &node));
                    for (app, _) in apps {
                        let (ips, meta) = self.keys.app(epoch, app);
                        command.arg(ips).arg(meta);
                    }
                    command.arg(&seq).arg(&seen).arg(max_ips_per_app);
                    for (_, partial) in apps {
                        command
                            .arg(partial.events)
                            .arg(u8::from(partial.ips_truncated))
                            .arg(partial.ips.len());
                        for &(ip, events) in &partial.ips {
                            command.arg(&ip.to_be_bytes()[..]).arg(events);
                        }
                    }
                    (*slot, command)
                })
                .collect();
            let replies = self.batch("write a flush", &commands)?;
            for ((_, apps), reply) in round.iter().zip(replies) {
                let answer = reply.map_err(|e| {
                    if e.to_string().contains("Function not found") {
                        // A primary that joined after the start (or lost its functions)
                        // gets them for the retry.
                        self.functions_missing = true;
                    }
                    StoreError::from_redis("write a flush", &e)
                });
                let answer: Vec<i64> = match answer.and_then(|value| decode("write a flush", value))
                {
                    Ok(answer) => answer,
                    Err(e) => {
                        if std::mem::take(&mut self.functions_missing) {
                            self.load_functions()?;
                        }
                        return Err(e);
                    }
                };
                let count = |n: i64| u64::try_from(n).unwrap_or(0);
                match answer[..] {
                    [-1, _, _] => outcome.duplicate_apps += apps.len() as u64,
                    [done, stale, pairs] => {
                        outcome.apps += count(done);
                        outcome.stale_apps += count(stale);
                        outcome.pairs += count(pairs);
                    }
                    _ => {
                        return Err(StoreError {
                            kind: StoreErrorKind::Refused,
                            message: format!("redis cluster: write a flush: answer {answer:?}"),
                        })
                    }
                }
            }
        }
        Ok(outcome)
    }

    /// Tells the other nodes what this node has applied: the epoch it counts in and the newest
    /// per-app reset, with its flush interval, so that a reset can wait for every live node.
    pub fn acknowledge(
        &mut self,
        epoch: u64,
        resets_seen: ResetId,
        flush_interval_ms: u64,
    ) -> Result<(), StoreError> {
        let nodes = self.keys.nodes();
        let mut command = redis::cmd("FCALL");
        command
            .arg("ipevents_acknowledge_v1")
            .arg(1)
            .arg(&nodes)
            .arg(&self.settings.node_id)
            .arg(epoch)
            .arg(resets_seen.to_string())
            .arg(flush_interval_ms);
        self.one::<i64>("acknowledge", &nodes, command).map(drop)
    }

    /// Takes this node out of the acknowledgements, at a graceful stop, so that no reset
    /// waits for it.
    pub fn leave(&mut self) -> Result<(), StoreError> {
        let nodes = self.keys.nodes();
        let mut command = redis::cmd("HDEL");
        command.arg(&nodes).arg(&self.settings.node_id);
        self.one::<i64>("leave", &nodes, command).map(drop)
    }

    /// Every node's last acknowledgement, and the store's clock, in ms; this node left out.
    pub fn acknowledgements(&mut self) -> Result<(u64, Vec<NodeAck>), StoreError> {
        let nodes = self.keys.nodes();
        let slot = slot_of(nodes.as_bytes());
        let mut all = redis::cmd("HGETALL");
        all.arg(&nodes);
        let mut replies = self
            .batch(
                "read acknowledgements",
                &[(slot, redis::cmd("TIME")), (slot, all)],
            )?
            .into_iter();
        let fail = |e: RedisError| StoreError::from_redis("read acknowledgements", &e);
        let time: (u64, u64) = decode(
            "read acknowledgements",
            replies.next().expect("two replies").map_err(fail)?,
        )?;
        let entries: Vec<(String, String)> = decode(
            "read acknowledgements",
            replies.next().expect("two replies").map_err(fail)?,
        )?;
        let now_ms = time.0 * 1000 + time.1 / 1000;
        let acks = entries
            .into_iter()
            .filter(|(node, _)| *node != self.settings.node_id)
            .filter_map(|(node, value)| NodeAck::parse(node, &value))
            .collect();
        Ok((now_ms, acks))
    }

    /// Starts a new epoch: every app of every node is forgotten. Returns the new epoch.
    pub fn bump_epoch(&mut self) -> Result<u64, StoreError> {
        let key = self.keys.epoch();
        let mut command = redis::cmd("INCR");
        command.arg(&key);
        self.one("reset", &key, command)
    }

    /// Forgets one app in `epoch` and tells the other nodes through the resets stream.
    pub fn reset_app(&mut self, epoch: u64, app: &AppKey) -> Result<ResetId, StoreError> {
        let resets = self.keys.resets();
        let mut command = redis::cmd("XADD");
        command
            .arg(&resets)
            .arg("MAXLEN")
            .arg("~")
            .arg(RESETS_KEPT)
            .arg("*")
            .arg("app")
            .arg(app.to_hex())
            .arg("epoch")
            .arg(epoch);
        let id: String = self.one("reset an app", &resets, command)?;
        let id = ResetId::parse(&id).ok_or_else(|| StoreError {
            kind: StoreErrorKind::Refused,
            message: format!("redis cluster: reset an app: bad stream id {id}"),
        })?;
        let (ips, meta) = self.keys.app(epoch, app);
        let mut command = redis::cmd("FCALL");
        command
            .arg("ipevents_reset_app_v1")
            .arg(2)
            .arg(&ips)
            .arg(meta)
            .arg(id.padded());
        self.one::<i64>("reset an app", &ips, command)?;
        Ok(id)
    }

    /// Deletes the app keys of every epoch before `current` on every primary, a batch at a
    /// time (SCAN, then UNLINK, which frees memory off Redis's main thread). Returns the keys
    /// deleted.
    pub fn sweep(&mut self, current: u64, deadline: Instant) -> Result<u64, StoreError> {
        self.refresh_slots()?;
        let mut deleted = 0;
        for primary in self.slots.addrs.clone() {
            let mut connection = self.connect_node(&primary)?;
            let mut cursor: u64 = 0;
            loop {
                if Instant::now() > deadline {
                    return Ok(deleted);
                }
                let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(self.keys.app_pattern())
                    .arg("COUNT")
                    .arg(1000)
                    .query(&mut connection)
                    .map_err(|e| StoreError::from_redis("sweep old epochs", &e))?;
                let old: Vec<&Vec<u8>> = keys
                    .iter()
                    .filter(|key| self.keys.epoch_of(key).is_some_and(|e| e < current))
                    .collect();
                if !old.is_empty() {
                    let mut pipe = redis::pipe();
                    for key in &old {
                        pipe.cmd("UNLINK").arg(*key).ignore();
                    }
                    pipe.query::<()>(&mut connection)
                        .map_err(|e| StoreError::from_redis("sweep old epochs", &e))?;
                    deleted += old.len() as u64;
                }
                cursor = next;
                if cursor == 0 {
                    break;
                }
            }
        }
        Ok(deleted)
    }
}

/// `cluster_state` from CLUSTER INFO on one seed.
fn cluster_state(settings: &StoreSettings, seed: &str) -> Result<String, String> {
    let info = settings.connection_info(seed)?;
    let client = redis::Client::open(info).map_err(|e| describe(&e))?;
    let mut connection = client
        .get_connection_with_timeout(settings.timeout)
        .map_err(|e| describe(&e))?;
    connection
        .set_read_timeout(Some(settings.timeout))
        .map_err(|e| describe(&e))?;
    let text: String = redis::cmd("CLUSTER")
        .arg("INFO")
        .query(&mut connection)
        .map_err(|e| describe(&e))?;
    text.lines()
        .find_map(|line| line.trim().strip_prefix("cluster_state:"))
        .map(str::to_owned)
        .ok_or_else(|| "CLUSTER INFO has no cluster_state".to_owned())
}

/// A reply as the type the caller expects; anything else is the store refusing.
fn decode<T: redis::FromRedisValue>(what: &str, value: Value) -> Result<T, StoreError> {
    redis::from_redis_value(value).map_err(|e| StoreError {
        kind: StoreErrorKind::Refused,
        message: format!("redis cluster: {what}: unexpected answer: {e}"),
    })
}

/// Entries of an XRANGE or XREVRANGE reply: (id, fields).
fn stream_entries(value: &Value) -> Vec<(ResetId, Vec<(String, String)>)> {
    let Value::Array(entries) = value else {
        return Vec::new();
    };
    entries
        .iter()
        .filter_map(|entry| {
            let Value::Array(parts) = entry else {
                return None;
            };
            let id: String = redis::from_redis_value(parts.first()?.clone()).ok()?;
            let fields: Vec<(String, String)> =
                redis::from_redis_value(parts.get(1)?.clone()).ok()?;
            Some((ResetId::parse(&id)?, fields))
        })
        .collect()
}

fn stored_app(
    ips: Vec<(Vec<u8>, u64)>,
    meta: Vec<(String, String)>,
    applied: Option<String>,
) -> StoredApp {
    let field = |name: &str| {
        meta.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let mut ips: Vec<(u32, u64)> = ips
        .into_iter()
        .filter_map(|(ip, events)| Some((u32::from_be_bytes(ip.try_into().ok()?), events)))
        .collect();
    ips.sort_unstable();
    StoredApp {
        partial: Partial {
            events: field("n").and_then(|n| n.parse().ok()).unwrap_or(0),
            ips,
            ips_truncated: field("t") == Some("1"),
        },
        applied,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_seqs_order_as_their_strings() {
        let ids = [
            ResetId { ms: 0, seq: 0 },
            ResetId { ms: 9, seq: 10 },
            ResetId { ms: 10, seq: 0 },
            ResetId {
                ms: 1_733_000_000_000,
                seq: 3,
            },
        ];
        for pair in ids.windows(2) {
            assert!(pair[0].padded() < pair[1].padded(), "{pair:?}");
            assert_eq!(ResetId::parse(&pair[1].to_string()), Some(pair[1]));
        }
        let seqs = [
            FlushSeq {
                incarnation: 1,
                flush: 99,
            },
            FlushSeq {
                incarnation: 2,
                flush: 0,
            },
            FlushSeq {
                incarnation: 2,
                flush: 100,
            },
        ];
        for pair in seqs.windows(2) {
            assert!(pair[0].padded() < pair[1].padded(), "{pair:?}");
        }
    }

    #[test]
    fn keys_keep_one_app_in_one_slot() {
        let keys = Keys {
            prefix: "ipevents".into(),
        };
        let app = AppKey([0xab; 32]);
        let (ips, meta) = keys.app(7, &app);
        let sha = "ab".repeat(32);
        assert_eq!(ips, format!("ipevents:e7:{{{sha}}}:ips"));
        assert_eq!(meta, format!("ipevents:e7:{{{sha}}}:meta"));
        assert_eq!(keys.epoch_of(ips.as_bytes()), Some(7));
        assert_eq!(keys.epoch_of(b"ipevents:epoch"), None);
        assert_eq!(keys.epoch_of(b"ipevents2:e1:{x}:ips"), None);
        assert_eq!(keys.epoch_of(b"ipevents:e12x"), None);
    }

    #[test]
    fn seeds_are_shown_without_passwords() {
        assert_eq!(
            redact("redis://:secret@127.0.0.1:7000/"),
            "redis://127.0.0.1:7000"
        );
        assert_eq!(redact("redis://127.0.0.1:7000"), "redis://127.0.0.1:7000");
        let settings = StoreSettings {
            seeds: vec!["redis://:hunter2@127.0.0.1:1".into(), "nonsense".into()],
            password: None,
            prefix: "ipevents".into(),
            node_id: "a".into(),
            timeout: Duration::from_secs(1),
        };
        let error = settings.validate().unwrap_err();
        assert!(error.contains("nonsense"), "{error}");
        assert!(!error.contains("hunter2"), "{error}");
        for (prefix, ok) in [
            ("ipevents", true),
            ("a.b-c_d", true),
            ("", false),
            ("a{b}", false),
        ] {
            let settings = StoreSettings {
                prefix: prefix.into(),
                seeds: vec![],
                ..settings.clone()
            };
            assert_eq!(settings.validate().is_ok(), ok, "{prefix:?}");
        }
    }

    #[test]
    fn slot_map_from_cluster_slots() {
        let node = |host: &str, port: i64| {
            Value::Array(vec![
                Value::BulkString(host.as_bytes().to_vec()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let range = |first: i64, last: i64, port: i64| {
            Value::Array(vec![
                Value::Int(first),
                Value::Int(last),
                node("127.0.0.1", port),
                node("127.0.0.1", port + 100),
            ])
        };
        let map = SlotMap::parse(
            &Value::Array(vec![
                range(10923, 16383, 7003),
                range(0, 5460, 7001),
                range(5461, 10922, 7002),
            ]),
            "127.0.0.1",
        );
        assert_eq!(map.ranges.len(), 3);
        for (slot, port) in [(0, 7001), (5460, 7001), (5461, 7002), (16383, 7003)] {
            assert_eq!(map.addrs[map.primary_of(slot)], ("127.0.0.1".into(), port));
        }
    }

    #[test]
    fn every_slot_has_a_tag() {
        for slot in [0, 1, 9500, 12182, 16383] {
            assert_eq!(slot_of(slot_tag(slot).as_bytes()), slot);
        }
        assert!((0..16384).all(|slot| slot_tag(slot).len() <= 4));
        let keys = Keys { prefix: "p".into() };
        let seq = keys.seq(12182, "edge-1");
        assert_eq!(slot_of(seq.as_bytes()), 12182, "{seq}");
        assert_eq!(keys.epoch_of(seq.as_bytes()), None, "not an app key");
    }

    #[test]
    fn slots_follow_the_hash_tag() {
        // Values from CLUSTER KEYSLOT.
        for (key, slot) in [
            (&b"123456789"[..], 12739),
            (b"foo", 12182),
            (b"{foo}:bar", 12182),
            (b"ipevents:e3:{foo}:ips", 12182),
            (b"", 0),
        ] {
            assert_eq!(slot_of(key), slot, "{}", String::from_utf8_lossy(key));
        }
        assert_ne!(
            slot_of(b"{}foo"),
            slot_of(b"foo"),
            "an empty tag hashes the whole key"
        );
    }
}
