//! Socket plumbing: the SO_REUSEPORT group, receive buffers, classic-BPF steering, batched
//! `recvmmsg`/`sendmmsg`, kernel receive timestamps and kernel drop counters.
//!
//! This is the only module with `unsafe`. Each `unsafe` block holds one libc call behind a
//! safe function, with a `SAFETY:` line. Nothing here parses or counts events.
#![allow(unsafe_code)]

use std::io;
use std::mem;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::time::{Duration, SystemTime};

use socket2::{Domain, Protocol, Socket, Type};

/// How the kernel spreads datagrams over the sockets of the group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
#[clap(rename_all = "lower")]
pub enum Steering {
    /// The kernel's flow hash of the source and destination addresses and ports: one sender
    /// socket always lands on the same worker.
    Hash,
    /// The CPU that received the datagram, modulo the number of workers.
    Cpu,
    /// A random worker for every datagram.
    Random,
    /// The worker that the app's sha hashes to, read from the datagram itself: each app lives
    /// on one worker, whatever the senders.
    App,
    /// As `app`, except for a few hot apps that the server finds in its own traffic and
    /// spreads over every worker at random (see [`attach_adaptive_steering`]).
    Adaptive,
}

impl Steering {
    /// Whether the steering gives each app a worker of its own: `app`, and `adaptive` for
    /// the apps that are not hot.
    pub fn is_keyed(self) -> bool {
        matches!(self, Steering::App | Steering::Adaptive)
    }

    /// The worker that this steering sends `app`'s datagrams to, when it has one: under `app`
    /// and `adaptive` steering the one its sha hashes to (for adaptive, while the app is not
    /// hot); `None` when any worker may get them.
    pub fn home_worker(self, app: &crate::wire::AppKey, workers: usize) -> Option<usize> {
        match self {
            Steering::App | Steering::Adaptive => Some(SteeringKey::of(app).app_socket(workers)),
            Steering::Hash | Steering::Cpu | Steering::Random => None,
        }
    }
}

impl std::fmt::Display for Steering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Steering::Hash => "hash",
            Steering::Cpu => "cpu",
            Steering::Random => "random",
            Steering::App => "app",
            Steering::Adaptive => "adaptive",
        })
    }
}

/// What the kernel granted for a requested receive buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rcvbuf {
    pub requested_bytes: usize,
    /// Usable bytes: the kernel reports twice this, its own bookkeeping included.
    pub granted_bytes: usize,
    /// Whether SO_RCVBUFFORCE (CAP_NET_ADMIN) set it, rather than SO_RCVBUF.
    pub forced: bool,
}

impl Rcvbuf {
    /// The most any socket gets: the kernel clamps a request to INT_MAX / 2, since it doubles
    /// it into an int.
    const MOST_GRANTABLE_BYTES: usize = (libc::c_int::MAX / 2) as usize;

    /// The kernel gave less than asked: without CAP_NET_ADMIN it caps at net.core.rmem_max.
    /// The clamp to `Self::MOST_GRANTABLE_BYTES` alone is not such a cap.
    pub fn capped(&self) -> bool {
        self.granted_bytes < self.requested_bytes.min(Self::MOST_GRANTABLE_BYTES)
    }

    /// One line to warn with when the buffer is far from what was asked, either way: capped
    /// at net.core.rmem_max, clamped to the kernel's largest (half of what was asked or
    /// less), or raised to the kernel's smallest (twice what was asked or more).
    pub fn warning(&self) -> Option<String> {
        let (granted, requested) = (self.granted_bytes, self.requested_bytes);
        let why = if self.capped() && !self.forced {
            format!(
                "without CAP_NET_ADMIN the kernel caps it at net.core.rmem_max (raise it: \
                 sysctl -w net.core.rmem_max={requested})"
            )
        } else if self.capped() || granted.saturating_mul(2) <= requested {
            format!(
                "the kernel grants at most {} bytes",
                granted.min(Self::MOST_GRANTABLE_BYTES)
            )
        } else if granted > requested.saturating_mul(2) {
            format!("the kernel's smallest is {granted} bytes")
        } else {
            return None;
        };
        Some(format!(
            "udp receive buffer is {granted} bytes, not the {requested} asked: {why}"
        ))
    }
}

/// Binds `workers` UDP sockets to `addr` with SO_REUSEPORT, non-blocking, with the kernel
/// keeping the receive time of the last datagram read (see [`last_received_at`]). Port 0 picks
/// one ephemeral port for the whole group.
pub fn bind_reuseport_group(
    addr: SocketAddr,
    workers: usize,
    rcvbuf_bytes: usize,
) -> io::Result<(Vec<UdpSocket>, Rcvbuf)> {
    if addr.port() != 0 {
        refuse_if_in_use(addr)?;
    }
    let mut sockets = Vec::with_capacity(workers);
    let mut addr = addr;
    let mut rcvbuf = None;
    for _ in 0..workers {
        let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        let granted = set_rcvbuf(&socket, rcvbuf_bytes)?;
        rcvbuf.get_or_insert(granted);
        keep_receive_times(&socket)?;
        socket.bind(&addr.into())?;
        if addr.port() == 0 {
            addr = socket
                .local_addr()?
                .as_socket()
                .ok_or_else(|| io::Error::other("bound address is not an IP address"))?;
        }
        sockets.push(UdpSocket::from(socket));
    }
    let rcvbuf = rcvbuf.ok_or_else(|| io::Error::other("no workers"))?;
    Ok((sockets, rcvbuf))
}

/// SO_REUSEPORT lets any socket of the same user join a group, so a second server on the
/// same port would silently take a share of the traffic. A plain bind first finds out.
fn refuse_if_in_use(addr: SocketAddr) -> io::Result<()> {
    let probe = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    probe.bind(&addr.into())
}

fn set_rcvbuf(socket: &Socket, bytes: usize) -> io::Result<Rcvbuf> {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    let forced = setsockopt_int(
        socket.as_fd(),
        libc::SOL_SOCKET,
        libc::SO_RCVBUFFORCE,
        value,
    )
    .is_ok();
    if !forced {
        socket.set_recv_buffer_size(bytes)?;
    }
    // Linux doubles SO_RCVBUF and silently caps it at net.core.rmem_max, so read it back.
    let granted_bytes = socket.recv_buffer_size()? / 2;
    Ok(Rcvbuf {
        requested_bytes: bytes,
        granted_bytes,
        forced,
    })
}

/// The usable receive buffer the kernel granted `socket`: half of what SO_RCVBUF reports,
/// which counts the kernel's own bookkeeping too.
pub fn granted_rcvbuf_bytes(socket: &UdpSocket) -> io::Result<usize> {
    Ok(socket2::SockRef::from(socket).recv_buffer_size()? / 2)
}

/// Asks for a send buffer of `bytes`, forcing past net.core.wmem_max where the process may.
pub fn set_sndbuf(socket: &UdpSocket, bytes: usize) -> io::Result<usize> {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    if setsockopt_int(
        socket.as_fd(),
        libc::SOL_SOCKET,
        libc::SO_SNDBUFFORCE,
        value,
    )
    .is_err()
    {
        socket2::SockRef::from(socket).set_send_buffer_size(bytes)?;
    }
    Ok(socket2::SockRef::from(socket).send_buffer_size()? / 2)
}

/// SIOCGSTAMPNS from linux/sockios.h (`SIOCGSTAMPNS_OLD`, which is the 64-bit `timespec`
/// form on 64-bit targets); the libc crate does not export it.
#[cfg(target_pointer_width = "64")]
const SIOCGSTAMPNS: libc::Ioctl = 0x8907;

/// Makes the kernel stamp datagrams on arrival and keep, per socket, the stamp of the last
/// one read, for [`last_received_at`].
///
/// SO_TIMESTAMPNS would instead build a control message for every datagram read, which
/// costs the kernel as much as a tenth of its receive path when only one stamp per batch is
/// wanted. The kernel switches the per-socket stamp on at the first SIOCGSTAMPNS (and turns
/// on arrival stamping system-wide while the socket lives); that first call, before any
/// datagram, answers ENOENT, which is expected.
fn keep_receive_times(socket: &Socket) -> io::Result<()> {
    last_received_at(socket).map(|_| ())
}

/// When the kernel received the last datagram read from `socket` (on the real-time clock);
/// `None` before the first. One `ioctl`; the socket must have been bound by
/// [`bind_reuseport_group`] for the stamp to be the arrival time.
pub fn last_received_at(socket: &impl AsRawFd) -> io::Result<Option<SystemTime>> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `socket` is a live descriptor, and SIOCGSTAMPNS writes one timespec through the
    // pointer, which points to `ts` for the whole call.
    let rc = unsafe {
        libc::ioctl(
            socket.as_raw_fd(),
            SIOCGSTAMPNS,
            &mut ts as *mut libc::timespec,
        )
    };
    if rc != 0 {
        let error = io::Error::last_os_error();
        return match error.raw_os_error() {
            Some(libc::ENOENT) => Ok(None),
            _ => Err(error),
        };
    }
    let since_epoch = Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32);
    Ok(Some(SystemTime::UNIX_EPOCH + since_epoch))
}

fn setsockopt_int(fd: BorrowedFd<'_>, level: i32, name: i32, value: libc::c_int) -> io::Result<()> {
    // SAFETY: `fd` is a live socket, and the option value points to a c_int of the given size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

// Classic BPF opcodes and ancillary offsets, from linux/filter.h.
const BPF_LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
const BPF_ALU_MOD_K: u16 = (libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K) as u16;
const BPF_RET_A: u16 = (libc::BPF_RET | libc::BPF_A) as u16;
const BPF_LD_B_ABS: u16 = (libc::BPF_LD | libc::BPF_B | libc::BPF_ABS) as u16;
const BPF_JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
const BPF_ALU_OR_K: u16 = (libc::BPF_ALU | libc::BPF_OR | libc::BPF_K) as u16;
const BPF_ALU_MUL_K: u16 = (libc::BPF_ALU | libc::BPF_MUL | libc::BPF_K) as u16;
const BPF_ALU_RSH_K: u16 = (libc::BPF_ALU | libc::BPF_RSH | libc::BPF_K) as u16;
const BPF_LD_MEM: u16 = (libc::BPF_LD | libc::BPF_MEM) as u16;
const BPF_ST: u16 = libc::BPF_ST as u16;

/// The most hot apps an adaptive steering program can spread. Classic BPF jumps are at most
/// 255 instructions long, and the program's longest jump (from the first check of the
/// datagram's header to the random fallback at its end) grows by four instructions a key:
/// 32 keys keep it at 140. `adaptive_program`'s test checks every jump.
pub const MAX_HOT_KEYS: usize = 32;

/// What `app` and `adaptive` steering read from a datagram: the sha's first 8 hex digits as
/// the two big-endian words at payload offsets 2 and 6, lower-cased (OR 0x20 on every byte,
/// which leaves digits as they are), high word first. Each app has one key; a few apps may
/// share one, which only means that they are steered together.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SteeringKey(pub u64);

impl SteeringKey {
    /// The key the steering program reads from any datagram for `app`.
    pub fn of(app: &crate::wire::AppKey) -> SteeringKey {
        let mut digits = [0u8; 8];
        // The sha's first four bytes are its first eight hex digits; the program sees them
        // lower-cased whatever case the sender used.
        let _ = hex_simd::encode(
            &app.0[..4],
            hex_simd::Out::from_slice(&mut digits),
            hex_simd::AsciiCase::Lower,
        );
        SteeringKey(u64::from_be_bytes(digits))
    }

    /// The socket (worker) that `app` and `adaptive` steering send an app of this key to
    /// while it is not hot: what the programs compute from the word at offset 2.
    pub fn app_socket(self, sockets: usize) -> usize {
        let word = self.words().0 | 0x2020_2020;
        let hashed = word.wrapping_mul(0x9e37_79b1) >> 16;
        hashed as usize % sockets.max(1)
    }

    /// The word at payload offset 2 (digits 1 to 4) and the one at offset 6 (digits 5 to 8).
    fn words(self) -> (u32, u32) {
        ((self.0 >> 32) as u32, self.0 as u32)
    }
}

impl std::fmt::Display for SteeringKey {
    /// The eight hex digits, as the program reads them.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0
            .to_be_bytes()
            .iter()
            .try_for_each(|byte| write!(f, "{}", byte.escape_ascii()))
    }
}

/// The classic BPF program that picks a socket index for every datagram, or `None` for the
/// kernel's own flow hash. `adaptive` starts with no hot app.
fn steering_program(steering: Steering, sockets: u32) -> Option<Vec<libc::sock_filter>> {
    let op = |code: u16, k: u32| libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    let jump_unless = |value: u32, skip: u8| libc::sock_filter {
        code: BPF_JEQ_K,
        jt: 0,
        jf: skip,
        k: value,
    };
    match steering {
        Steering::Hash => None,
        Steering::Cpu => Some(by_ancillary(libc::SKF_AD_CPU, sockets).to_vec()),
        Steering::Random => Some(by_ancillary(libc::SKF_AD_RANDOM, sockets).to_vec()),
        Steering::App => {
            // The program runs with the UDP payload at offset 0. A datagram that starts the
            // usual way, with the sha field (key 0x0a, length 64), goes to the worker that
            // four of the sha's hex digits hash to, so that each app lives on one worker.
            // Anything else goes to a random worker: merging makes any choice correct.
            let mut program = vec![
                op(BPF_LD_B_ABS, 0),
                jump_unless(0x0a, 8),
                op(BPF_LD_B_ABS, 1),
                jump_unless(64, 6),
                op(BPF_LD_W_ABS, 2),
                // Lower-case the letters (digits already have this bit), so that either case
                // of a sha picks the same worker.
                op(BPF_ALU_OR_K, 0x2020_2020),
                op(BPF_ALU_MUL_K, 0x9e37_79b1),
                op(BPF_ALU_RSH_K, 16),
                op(BPF_ALU_MOD_K, sockets),
                op(BPF_RET_A, 0),
            ];
            program.extend(by_ancillary(libc::SKF_AD_RANDOM, sockets));
            Some(program)
        }
        Steering::Adaptive => Some(adaptive_program(sockets, &[])),
    }
}

/// Returns an ancillary value (the CPU, a random number) modulo `sockets`.
fn by_ancillary(ancillary: i32, sockets: u32) -> [libc::sock_filter; 3] {
    let op = |code: u16, k: u32| libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    [
        op(BPF_LD_W_ABS, (libc::SKF_AD_OFF + ancillary) as u32),
        op(BPF_ALU_MOD_K, sockets),
        op(BPF_RET_A, 0),
    ]
}

/// The scratch memory words that hold the datagram's key while the program compares it.
const MEM_HIGH_WORD: u32 = 0;
const MEM_LOW_WORD: u32 = 1;

/// The adaptive steering program: a datagram whose key is in `hot` goes to a random socket,
/// any other datagram with the sha field first to the socket that `app` steering picks (the
/// same hash of the same four hex digits), and anything else to a random socket. At most
/// [`MAX_HOT_KEYS`] keys.
///
/// Layout, with every jump forward and the random fallback last:
///
/// ```text
///  0..=3   the header checks: byte 0 is 0x0a and byte 1 is 64, else to the fallback
///  4..=9   M[low] = word 6 | 0x20202020; M[high] = A = word 2 | 0x20202020
///  per key (4 instructions), A holding the high word:
///          A == high? else skip to the next key's first instruction
///          A = M[low]; A == low? to the fallback
///          A = M[high]
///  then    the app hash of A, returned
///  last    the random fallback (3 instructions)
/// ```
fn adaptive_program(sockets: u32, hot: &[SteeringKey]) -> Vec<libc::sock_filter> {
    assert!(hot.len() <= MAX_HOT_KEYS, "{} hot keys", hot.len());
    let op = |code: u16, k: u32| libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    const HEADER: usize = 10;
    const PER_KEY: usize = 4;
    const APP_HASH: usize = 4;
    let fallback = HEADER + PER_KEY * hot.len() + APP_HASH;
    // A jump's offset counts from the instruction after it.
    let to_fallback = |from: usize| {
        u8::try_from(fallback - from - 1).expect("MAX_HOT_KEYS keeps every jump within 255")
    };
    let jump = |k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: BPF_JEQ_K,
        jt,
        jf,
        k,
    };
    let mut program = vec![
        op(BPF_LD_B_ABS, 0),
        jump(0x0a, 0, to_fallback(1)),
        op(BPF_LD_B_ABS, 1),
        jump(64, 0, to_fallback(3)),
        op(BPF_LD_W_ABS, 6),
        op(BPF_ALU_OR_K, 0x2020_2020),
        op(BPF_ST, MEM_LOW_WORD),
        op(BPF_LD_W_ABS, 2),
        // Lower-case the letters, as `app` steering does.
        op(BPF_ALU_OR_K, 0x2020_2020),
        op(BPF_ST, MEM_HIGH_WORD),
    ];
    for key in hot {
        let (high, low) = key.words();
        let at = program.len();
        program.extend([
            jump(high, 0, 3),
            op(BPF_LD_MEM, MEM_LOW_WORD),
            jump(low, to_fallback(at + 2), 0),
            op(BPF_LD_MEM, MEM_HIGH_WORD),
        ]);
    }
    program.extend([
        op(BPF_ALU_MUL_K, 0x9e37_79b1),
        op(BPF_ALU_RSH_K, 16),
        op(BPF_ALU_MOD_K, sockets),
        op(BPF_RET_A, 0),
    ]);
    debug_assert_eq!(program.len(), fallback);
    program.extend(by_ancillary(libc::SKF_AD_RANDOM, sockets));
    program
}

/// Attaches the steering program to the group that `socket` belongs to. Call it once every
/// socket is bound: the program returns an index into the group in bind order.
pub fn attach_steering(socket: &UdpSocket, steering: Steering, sockets: usize) -> io::Result<()> {
    let sockets = u32::try_from(sockets).map_err(|_| io::Error::other("too many sockets"))?;
    match steering_program(steering, sockets) {
        Some(program) => attach_reuseport_program(socket, program),
        None => Ok(()),
    }
}

/// Replaces the group's program with adaptive steering that spreads the apps of the `hot`
/// keys (at most [`MAX_HOT_KEYS`]) over every socket and steers every other app as `app`
/// steering does.
///
/// The kernel swaps the group's program atomically (one RCU pointer), and runs exactly one
/// program, the old or the new, for each datagram, to pick exactly one socket; a datagram
/// already queued on a socket stays there. So a swap neither loses a datagram nor delivers
/// one twice: it only changes which worker counts the datagrams that follow.
pub fn attach_adaptive_steering(
    socket: &UdpSocket,
    sockets: usize,
    hot: &[SteeringKey],
) -> io::Result<()> {
    let sockets = u32::try_from(sockets).map_err(|_| io::Error::other("too many sockets"))?;
    if hot.len() > MAX_HOT_KEYS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} hot keys, more than {MAX_HOT_KEYS}", hot.len()),
        ));
    }
    attach_reuseport_program(socket, adaptive_program(sockets, hot))
}

/// SO_ATTACH_REUSEPORT_CBPF: the kernel copies and checks the program, then makes it the
/// group's, replacing any program attached before.
fn attach_reuseport_program(
    socket: &UdpSocket,
    mut program: Vec<libc::sock_filter>,
) -> io::Result<()> {
    let fprog = libc::sock_fprog {
        len: u16::try_from(program.len()).map_err(|_| io::Error::other("program too long"))?,
        filter: program.as_mut_ptr(),
    };
    // SAFETY: `fprog` points to `program`, which outlives the call; the kernel copies it.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            (&fprog as *const libc::sock_fprog).cast(),
            mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Gives the calling thread the lowest CPU priority (nice 19), for background work that must
/// not take CPU from the workers.
pub fn lower_thread_priority() -> io::Result<()> {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    // SAFETY: setpriority on our own thread id with a valid priority only changes scheduling.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 19) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Hands the heap's free pages back to the operating system (glibc's `malloc_trim`), after a
/// reset has freed a large table. glibc keeps freed memory in its arenas otherwise, and the
/// process's RSS would not go down. The other allocators the server can be built with give
/// pages back on their own.
pub fn release_free_memory() {
    #[cfg(all(
        target_env = "gnu",
        not(feature = "alloc-mimalloc"),
        not(feature = "alloc-jemalloc")
    ))]
    // SAFETY: malloc_trim only walks and trims glibc's own arenas, under their locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// CPU time the calling thread has used. It stands still while the thread waits for a CPU,
/// which is what lets a budget of it survive contention with other processes.
pub fn thread_cpu_time() -> io::Result<Duration> {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Duration::new(
        u64::try_from(now.tv_sec).unwrap_or(0),
        u32::try_from(now.tv_nsec).unwrap_or(0),
    ))
}

/// Datagrams the kernel dropped on this socket because its receive queue was full, from
/// SO_MEMINFO. `Ok(None)` when the kernel does not report it.
pub fn kernel_drops(socket: &impl AsRawFd) -> io::Result<Option<u64>> {
    // SK_MEMINFO_VARS is 9 on every kernel that has SO_MEMINFO.
    let mut meminfo = [0u32; 9];
    let mut len = mem::size_of_val(&meminfo) as libc::socklen_t;
    // SAFETY: the buffer and its length describe `meminfo`, which the kernel fills.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MEMINFO,
            meminfo.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let drops = libc::SK_MEMINFO_DROPS as usize;
    if (len as usize) < (drops + 1) * mem::size_of::<u32>() {
        return Ok(None);
    }
    Ok(Some(u64::from(meminfo[drops])))
}

/// Bytes one receive slot holds: one more than the largest valid datagram, so that an
/// oversized datagram shows as one, even without looking at MSG_TRUNC.
pub const SLOT_BYTES: usize = crate::wire::MAX_DATAGRAM_BYTES + 1;

/// Reusable buffers for one `recvmmsg` call: allocated once per worker, never per datagram.
/// There is no control buffer: the receive time comes from [`last_received_at`], once per
/// batch.
pub struct RecvBatch {
    payload: Vec<u8>,
    /// Read only by the kernel, through `headers`; owned here so that it lives as long.
    #[allow(dead_code)]
    iovecs: Vec<libc::iovec>,
    headers: Vec<libc::mmsghdr>,
    received: usize,
}

// SAFETY: the raw pointers inside `iovecs` and `headers` point only into the batch's own heap
// buffers, which are allocated once and never grow or move; nothing else aliases them.
unsafe impl Send for RecvBatch {}

impl RecvBatch {
    pub fn new(capacity: usize) -> RecvBatch {
        let capacity = capacity.max(1);
        let mut payload = vec![0u8; capacity * SLOT_BYTES];
        let mut iovecs: Vec<libc::iovec> = payload
            .chunks_exact_mut(SLOT_BYTES)
            .map(|slot| libc::iovec {
                iov_base: slot.as_mut_ptr().cast(),
                iov_len: SLOT_BYTES,
            })
            .collect();
        let headers = iovecs
            .iter_mut()
            .map(|iovec| {
                // SAFETY: mmsghdr is a plain C struct for which all-zero bytes are valid.
                let mut header: libc::mmsghdr = unsafe { mem::zeroed() };
                header.msg_hdr.msg_iov = iovec;
                header.msg_hdr.msg_iovlen = 1;
                header
            })
            .collect();
        RecvBatch {
            payload,
            iovecs,
            headers,
            received: 0,
        }
    }

    pub fn capacity(&self) -> usize {
        self.headers.len()
    }

    /// Receives up to `capacity` datagrams without blocking. `WouldBlock` when none is queued.
    pub fn recv(&mut self, socket: &impl AsRawFd) -> io::Result<usize> {
        self.received = 0;
        // Nothing is reset between calls: the headers were set once in `new`, with no name
        // and no control buffer, so the kernel leaves `msg_namelen` and `msg_controllen` at 0,
        // and it writes `msg_len` and `msg_flags` of every message it returns, the only ones
        // `datagram` reads.
        // SAFETY: every header points to its own iovec and payload slot, which live in `self`
        // for the whole call; the count matches the headers' length.
        let rc = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                self.headers.as_mut_ptr(),
                self.headers.len() as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        self.received = rc as usize;
        Ok(self.received)
    }

    /// The `i`th datagram of the last `recv`, cut to the slot; an oversized datagram shows as
    /// `SLOT_BYTES` long.
    pub fn datagram(&self, i: usize) -> &[u8] {
        debug_assert!(i < self.received);
        let header = &self.headers[i];
        let truncated = header.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
        let len = if truncated {
            SLOT_BYTES
        } else {
            (header.msg_len as usize).min(SLOT_BYTES)
        };
        &self.payload[i * SLOT_BYTES..i * SLOT_BYTES + len]
    }
}

/// Reusable buffers for one `sendmmsg` call to a single connected destination.
pub struct SendBatch {
    iovecs: Vec<libc::iovec>,
    headers: Vec<libc::mmsghdr>,
}

// SAFETY: the raw pointers are rebuilt from borrowed slices at every call and never kept.
unsafe impl Send for SendBatch {}

impl SendBatch {
    pub fn new(capacity: usize) -> SendBatch {
        SendBatch {
            iovecs: Vec::with_capacity(capacity),
            // SAFETY: mmsghdr is a plain C struct for which all-zero bytes are valid.
            headers: (0..capacity.max(1))
                .map(|_| unsafe { mem::zeroed() })
                .collect(),
        }
    }

    /// Sends each of `datagrams` (at most the batch capacity) on a connected socket; returns
    /// how many the kernel took, which may be fewer.
    pub fn send(&mut self, socket: &UdpSocket, datagrams: &[&[u8]]) -> io::Result<usize> {
        let count = datagrams.len().min(self.headers.len());
        self.iovecs.clear();
        for datagram in &datagrams[..count] {
            self.iovecs.push(libc::iovec {
                iov_base: datagram.as_ptr() as *mut libc::c_void,
                iov_len: datagram.len(),
            });
        }
        for (header, iovec) in self.headers.iter_mut().zip(self.iovecs.iter_mut()) {
            // SAFETY: mmsghdr is a plain C struct for which all-zero bytes are valid.
            *header = unsafe { mem::zeroed() };
            header.msg_hdr.msg_iov = iovec;
            header.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: the first `count` headers point to iovecs that point into `datagrams`,
        // which the kernel only reads and which outlive the call.
        let rc = unsafe {
            libc::sendmmsg(
                socket.as_raw_fd(),
                self.headers.as_mut_ptr(),
                count as libc::c_uint,
                0,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(rc as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_batch_reads_the_lengths_of_its_own_datagrams() {
        // (datagram lengths sent, lengths the batch shows): the same slots take an oversized
        // datagram in one call and short ones in the next, since nothing resets them.
        let oversized = SLOT_BYTES + 100;
        let rounds: [(&[usize], &[usize]); 4] = [
            (&[oversized, 10, 0], &[SLOT_BYTES, 10, 0]),
            (&[10, oversized, 5], &[10, SLOT_BYTES, 5]),
            (&[1], &[1]),
            (&[79, 79, 79, 79], &[79, 79, 79, 79]),
        ];
        let receiver = UdpSocket::bind("127.0.0.1:0").unwrap();
        receiver.set_nonblocking(true).unwrap();
        let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
        sender.connect(receiver.local_addr().unwrap()).unwrap();
        let mut batch = RecvBatch::new(4);
        for (sent, want) in rounds {
            for &len in sent {
                sender.send(&vec![0xab; len]).unwrap();
            }
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            let received = loop {
                match batch.recv(&receiver) {
                    Ok(n) if n == sent.len() => break n,
                    // Loopback delivers before `send` returns; this only guards a slow kernel.
                    Ok(n) => panic!("{n} of {} datagrams in one call", sent.len()),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        assert!(std::time::Instant::now() < deadline, "nothing arrived");
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                    Err(e) => panic!("recv: {e}"),
                }
            };
            let lens: Vec<usize> = (0..received).map(|i| batch.datagram(i).len()).collect();
            assert_eq!(lens, want, "sent {sent:?}");
        }
    }

    #[test]
    fn warns_when_the_buffer_is_far_from_the_request() {
        let check = |requested_bytes, granted_bytes, forced, want: Option<&str>| {
            let rcvbuf = Rcvbuf {
                requested_bytes,
                granted_bytes,
                forced,
            };
            let warning = rcvbuf.warning();
            match want {
                None => assert_eq!(warning, None, "{rcvbuf:?}"),
                Some(reason) => assert!(
                    warning.as_deref().is_some_and(|w| w.contains(reason)),
                    "{rcvbuf:?}: {warning:?}"
                ),
            }
        };
        check(16 << 20, 16 << 20, true, None);
        check(1000, 1152, true, None);
        check(16 << 20, 4 << 20, false, Some("net.core.rmem_max"));
        check(0, 1152, true, Some("the kernel's smallest is 1152 bytes"));
        check(0, 1152, false, Some("the kernel's smallest"));
        check(
            99_999_999_999_999,
            Rcvbuf::MOST_GRANTABLE_BYTES,
            true,
            Some("the kernel grants at most 1073741823 bytes"),
        );
        check(
            Rcvbuf::MOST_GRANTABLE_BYTES + 1,
            Rcvbuf::MOST_GRANTABLE_BYTES,
            true,
            None,
        );
    }

    #[test]
    fn steering_programs() {
        assert!(steering_program(Steering::Hash, 4).is_none());
        for (steering, ancillary) in [
            (Steering::Cpu, libc::SKF_AD_CPU),
            (Steering::Random, libc::SKF_AD_RANDOM),
        ] {
            let program = steering_program(steering, 3).unwrap();
            assert_eq!(program[0].k, (libc::SKF_AD_OFF + ancillary) as u32);
            assert_eq!(program[1].k, 3);
            assert_eq!(program[2].code, BPF_RET_A);
        }
        // Every jump of the app program lands on the random fallback, and both paths return.
        let program = steering_program(Steering::App, 3).unwrap();
        let fallback = program.len() - 3;
        for (i, op) in program.iter().enumerate() {
            if op.code == BPF_JEQ_K {
                assert_eq!(i + 1 + usize::from(op.jf), fallback);
            }
        }
        assert_eq!(program[fallback - 1].code, BPF_RET_A);
        assert_eq!(program[fallback - 2].k, 3);
        assert_eq!(program.last().unwrap().code, BPF_RET_A);
    }

    /// Runs a classic BPF program as the kernel's reuseport hook does, over a UDP payload,
    /// with `random` as SKF_AD_RANDOM. A load past the payload's end ends the program with 0,
    /// as in the kernel. Only the opcodes the steering programs use.
    fn run(program: &[libc::sock_filter], payload: &[u8], random: u32) -> u32 {
        let (mut a, mut mem, mut pc) = (0u32, [0u32; 16], 0);
        loop {
            let op = program[pc];
            let k = op.k as usize;
            pc += 1;
            match op.code {
                BPF_LD_B_ABS => match payload.get(k) {
                    Some(&byte) => a = byte.into(),
                    None => return 0,
                },
                BPF_LD_W_ABS if op.k == (libc::SKF_AD_OFF + libc::SKF_AD_RANDOM) as u32 => {
                    a = random
                }
                BPF_LD_W_ABS => match payload.get(k..k + 4) {
                    Some(word) => a = u32::from_be_bytes(word.try_into().unwrap()),
                    None => return 0,
                },
                BPF_LD_MEM => a = mem[k],
                BPF_ST => mem[k] = a,
                BPF_ALU_OR_K => a |= op.k,
                BPF_ALU_MUL_K => a = a.wrapping_mul(op.k),
                BPF_ALU_RSH_K => a >>= op.k,
                BPF_ALU_MOD_K => a %= op.k,
                BPF_JEQ_K => pc += usize::from(if a == op.k { op.jt } else { op.jf }),
                BPF_RET_A => return a,
                code => panic!("opcode {code:#x} is not interpreted"),
            }
        }
    }

    /// A sha whose first eight hex digits, its steering key, are `n`'s.
    fn sha_of(n: u32) -> String {
        format!("{n:08x}{}", "5".repeat(56))
    }

    fn key_of(sha: &str) -> SteeringKey {
        SteeringKey::of(&crate::wire::AppKey::from_hex(sha.as_bytes()).unwrap())
    }

    #[test]
    fn adaptive_jumps_stay_inside_the_program() {
        for keys in [0, 1, 2, MAX_HOT_KEYS] {
            let hot: Vec<SteeringKey> = (0..keys as u32).map(|n| key_of(&sha_of(n))).collect();
            let program = adaptive_program(3, &hot);
            for (i, op) in program.iter().enumerate() {
                if op.code == BPF_JEQ_K {
                    for offset in [op.jt, op.jf] {
                        assert!(
                            i + 1 + usize::from(offset) < program.len(),
                            "{keys} keys: {i}"
                        );
                    }
                }
            }
            // Both exits return.
            assert_eq!(program.last().unwrap().code, BPF_RET_A);
            assert_eq!(program[program.len() - 4].code, BPF_RET_A);
        }
    }

    #[test]
    #[should_panic(expected = "33 hot keys")]
    fn adaptive_refuses_more_keys_than_fit() {
        let hot = vec![SteeringKey(0); MAX_HOT_KEYS + 1];
        adaptive_program(3, &hot);
    }

    #[test]
    fn steering_key_is_what_the_program_reads() {
        for sha in [sha_of(0x0123_4567), "AbCdEf01".repeat(8)] {
            let datagram = crate::wire::encode(&sha, 1);
            let word = |at: usize| {
                u64::from(u32::from_be_bytes(datagram[at..at + 4].try_into().unwrap()))
                    | 0x2020_2020
            };
            assert_eq!(key_of(&sha), SteeringKey(word(2) << 32 | word(6)), "{sha}");
        }
    }

    #[test]
    fn app_socket_is_where_the_program_sends_a_cold_app() {
        let mut rng_state = 0x1234_5678u32;
        for sockets in [1u32, 2, 3, 7, 64] {
            let program = steering_program(Steering::App, sockets).unwrap();
            for _ in 0..200 {
                rng_state = rng_state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                let sha = sha_of(rng_state);
                let datagram = crate::wire::encode(&sha, 1);
                let want = run(&program, &datagram, 0);
                assert_eq!(
                    key_of(&sha).app_socket(sockets as usize),
                    want as usize,
                    "{sha} over {sockets}"
                );
            }
        }
    }

    #[test]
    fn adaptive_spreads_hot_apps_and_steers_the_rest_as_app_does() {
        let sockets = 3;
        let app = steering_program(Steering::App, sockets).unwrap();
        let hot_shas = [sha_of(0xaaaa_0001), sha_of(0xbbbb_0002)];
        let hot: Vec<SteeringKey> = hot_shas.iter().map(|sha| key_of(sha)).collect();
        // (hot set, datagram, SKF_AD_RANDOM) and the socket the program must pick.
        #[track_caller]
        fn check(hot: &[SteeringKey], datagram: &[u8], random: u32, want: u32) {
            let program = adaptive_program(3, hot);
            assert_eq!(run(&program, datagram, random), want, "{datagram:02x?}");
        }
        let by_app = |datagram: &[u8]| run(&app, datagram, 0);
        for n in 0..2_000u32 {
            let sha = sha_of(n.wrapping_mul(0x9e37_79b9));
            let datagram = crate::wire::encode(&sha, 1);
            // A cold app goes where `app` steering sends it, whatever the random number and
            // whatever the hot set, in either case of hex digits.
            for hot in [&[][..], &hot[..]] {
                check(hot, &datagram, 1, by_app(&datagram));
                check(hot, &datagram, 2, by_app(&datagram));
                let upper = crate::wire::encode(&sha.to_uppercase(), 1);
                check(hot, &upper, 1, by_app(&datagram));
            }
        }
        for sha in &hot_shas {
            for datagram in [
                crate::wire::encode(sha, 7),
                crate::wire::encode(&sha.to_uppercase(), 7),
            ] {
                check(&hot, &datagram, 4, 1);
                check(&hot, &datagram, 5, 2);
                check(&[], &datagram, 5, by_app(&datagram));
            }
        }
        // An app that shares only the first four hex digits with a hot one is not hot.
        let near = crate::wire::encode(&sha_of(0xaaaa_0009), 1);
        check(&hot, &near, 5, by_app(&near));
        // Anything but the sha field first goes to a random socket; a datagram too short to
        // hold the key ends the program at the load, which picks socket 0.
        check(&hot, b"\x12\x04abcd", 5, 2);
        check(&hot, &[0x0a, 63, b'a'], 4, 1);
        check(&hot, &[0x0a, 64, b'a', b'b'], 4, 0);
        // The fullest hot set: every key spread, a cold app still hashed.
        let full: Vec<SteeringKey> = (0..MAX_HOT_KEYS as u32)
            .map(|n| key_of(&sha_of(n << 8)))
            .collect();
        for n in 0..MAX_HOT_KEYS as u32 {
            check(&full, &crate::wire::encode(&sha_of(n << 8), 1), 7, 1);
        }
        check(&full, &near, 7, by_app(&near));
    }

    /// Which socket of `sockets` each datagram reached: counts per socket, read until every
    /// one of `sent` has arrived.
    fn landed(sockets: &[UdpSocket], sent: usize) -> Vec<usize> {
        let mut counts = vec![0; sockets.len()];
        let mut batch = RecvBatch::new(64);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while counts.iter().sum::<usize>() < sent {
            assert!(std::time::Instant::now() < deadline, "{counts:?} of {sent}");
            for (socket, count) in sockets.iter().zip(&mut counts) {
                match batch.recv(socket) {
                    Ok(n) => *count += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("recv: {e}"),
                }
            }
        }
        counts
    }

    #[test]
    fn adaptive_steering_swaps_programs_on_a_live_group() {
        let (sockets, _) =
            bind_reuseport_group("127.0.0.1:0".parse().unwrap(), 2, 1 << 20).unwrap();
        attach_steering(&sockets[0], Steering::Adaptive, 2).unwrap();
        let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
        sender.connect(sockets[0].local_addr().unwrap()).unwrap();
        let hot_sha = sha_of(0x1234_5678);
        let send = |sha: &str, times: usize| {
            let datagram = crate::wire::encode(sha, 1);
            for _ in 0..times {
                sender.send(&datagram).unwrap();
            }
            landed(&sockets, times)
        };
        let on_one_socket = |counts: &[usize]| counts.iter().filter(|&&n| n > 0).count() == 1;
        // With no hot app, one sender's app lands on one socket.
        assert!(on_one_socket(&send(&hot_sha, 200)));
        // Hot, it lands on both; another app still on one. The odds that 200 random picks all
        // fall on one socket are 2^-199.
        let hot = [key_of(&hot_sha)];
        attach_adaptive_steering(&sockets[1], 2, &hot).unwrap();
        assert!(!on_one_socket(&send(&hot_sha, 200)));
        assert!(on_one_socket(&send(&sha_of(0x9999_0000), 200)));
        // Cooled down, it is back on one socket.
        attach_adaptive_steering(&sockets[0], 2, &[]).unwrap();
        assert!(on_one_socket(&send(&hot_sha, 200)));
        let too_many = vec![SteeringKey(0); MAX_HOT_KEYS + 1];
        let refused = attach_adaptive_steering(&sockets[0], 2, &too_many).unwrap_err();
        assert_eq!(refused.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn batch_receives_payloads_and_timestamps() {
        let (sockets, _) =
            bind_reuseport_group("127.0.0.1:0".parse().unwrap(), 1, 1 << 20).unwrap();
        let receiver = &sockets[0];
        assert_eq!(last_received_at(receiver).unwrap(), None);
        let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
        sender.connect(receiver.local_addr().unwrap()).unwrap();
        // The kernel switches arrival stamps on for everyone a moment after the first socket
        // asks (a deferred static key): until then a datagram arrives unstamped, and the
        // ioctl answers with the time of the call. Wait until a probe shows a real stamp.
        let mut batch = RecvBatch::new(8);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            sender.send(b"probe").unwrap();
            std::thread::sleep(Duration::from_millis(20));
            while batch.recv(receiver).is_ok() {}
            let stamped = last_received_at(receiver).unwrap().unwrap();
            let age = SystemTime::now()
                .duration_since(stamped)
                .unwrap_or_default();
            if age >= Duration::from_millis(10) || std::time::Instant::now() > deadline {
                break;
            }
        }
        let big = vec![7u8; 2000];
        let mut send = SendBatch::new(4);
        let sent_at = SystemTime::now();
        let sent = send.send(&sender, &[b"one", b"", &big]).unwrap();
        assert_eq!(sent, 3);
        // A queue held this long must show it: the stamp is the kernel's arrival time, not
        // the time the datagram was read.
        std::thread::sleep(Duration::from_millis(100));
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while got.len() < 3 && std::time::Instant::now() < deadline {
            match batch.recv(receiver) {
                Ok(n) => {
                    let read_at = SystemTime::now();
                    let received_at = last_received_at(receiver).unwrap().unwrap();
                    assert!(received_at >= sent_at - Duration::from_millis(1));
                    let held = read_at.duration_since(received_at).unwrap();
                    assert!(held >= Duration::from_millis(100), "held {held:?}");
                    for i in 0..n {
                        got.push(batch.datagram(i).to_vec());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                Err(e) => panic!("recv: {e}"),
            }
        }
        assert_eq!(got[0], b"one");
        assert_eq!(got[1], b"");
        assert_eq!(got[2].len(), SLOT_BYTES);
        assert!(matches!(kernel_drops(receiver), Ok(Some(0))));
    }
}
