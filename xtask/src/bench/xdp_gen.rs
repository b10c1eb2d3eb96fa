//! A packet generator that sends from inside the kernel: BPF_PROG_TEST_RUN in live-frames mode
//! (`BPF_F_TEST_XDP_LIVE_FRAMES`, kernel 5.18+) runs a tiny XDP program over a frame, and the
//! program's `XDP_TX` becomes a real transmit on the device named as the frame's ingress (the
//! kernel turns `XDP_TX` into a redirect back to that device, i.e. its `ndo_xdp_xmit`). No socket,
//! no skb, no qdisc on the sending side: tens of nanoseconds a frame, where an AF_PACKET
//! `sendmmsg` costs several hundred. It is the mechanism of `xdp-trafficgen` (xdp-tools), which
//! sends IPv6 only; this one sends IPv4, which is what the prefilter judges.
//!
//! The program (15 instructions, loaded with the bpf(2) syscall: it is too small to be worth a
//! BPF object for aya to load) writes a random value into the low 16 bits of the IPv4 source
//! address and its ones' complement into the IP ID, so every frame comes from another address of
//! the /16 and the header checksum stays valid without being recomputed (the frame starts with
//! those fields at 0 and 0xffff: the two words always sum to 0xffff, ones' complement zero).

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

use anyhow::bail;

/// Offsets in the Ethernet frame: the IPv4 ID and the low half of the source address.
const IP_ID_OFFSET: i16 = 14 + 4;
const SADDR_LOW_OFFSET: i16 = 14 + 12 + 2;
/// Bytes the program must be able to touch (Ethernet + IPv4 headers).
const HEADERS_LEN: i32 = 14 + 20;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_XDP: u32 = 37;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;
const BPF_FUNC_GET_PRANDOM_U32: i32 = 7;
const XDP_DROP: i32 = 1;
const XDP_TX: i32 = 3;

/// One eBPF instruction (`struct bpf_insn`): opcode, dst/src registers, offset, immediate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: dst | (src << 4),
        off,
        imm,
    }
}

// Opcodes (uapi linux/bpf_common.h, linux/bpf.h).
const MOV64_REG: u8 = 0xbf;
const MOV64_IMM: u8 = 0xb7;
const ADD64_IMM: u8 = 0x07;
const XOR64_IMM: u8 = 0xa7;
const LDX_W: u8 = 0x61;
const STX_H: u8 = 0x6b;
const JGT_REG: u8 = 0x2d;
const CALL: u8 = 0x85;
const EXIT: u8 = 0x95;

/// The generator's XDP program: r = random; frame.saddr[2..4] = r; frame.id = !r; XDP_TX.
pub const PROGRAM: [Insn; 15] = [
    insn(MOV64_REG, 6, 1, 0, 0),                   // r6 = ctx
    insn(CALL, 0, 0, 0, BPF_FUNC_GET_PRANDOM_U32), // r0 = random
    insn(MOV64_REG, 7, 0, 0, 0),                   // r7 = r0
    insn(LDX_W, 2, 6, 0, 0),                       // r2 = ctx->data
    insn(LDX_W, 3, 6, 4, 0),                       // r3 = ctx->data_end
    insn(MOV64_REG, 4, 2, 0, 0),                   // r4 = data
    insn(ADD64_IMM, 4, 0, 0, HEADERS_LEN),         // r4 += headers
    insn(JGT_REG, 4, 3, 5, 0),                     // if r4 > data_end: drop
    insn(STX_H, 2, 7, SADDR_LOW_OFFSET, 0),        // saddr low half = r
    insn(XOR64_IMM, 7, 0, 0, 0xffff),              // r7 = !r (low 16 bits)
    insn(STX_H, 2, 7, IP_ID_OFFSET, 0),            // id = !r
    insn(MOV64_IMM, 0, 0, 0, XDP_TX),              // return XDP_TX
    insn(EXIT, 0, 0, 0, 0),
    insn(MOV64_IMM, 0, 0, 0, XDP_DROP), // drop: return XDP_DROP
    insn(EXIT, 0, 0, 0, 0),
];

fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).unwrap_or(0)
}

/// Whether an IPv4 header's checksum verifies (the ones' complement sum of all its words,
/// checksum included, is 0xffff).
#[cfg(test)]
fn ipv4_checksum_ok(header: &[u8]) -> bool {
    ipv4_checksum(header) == 0
}

/// A minimal UDP frame (60 bytes before the FCS) from `src` to `dst`, UDP checksum 0 (none),
/// IP ID `id`, with a valid IPv4 header checksum so the stack's own checks do not drop it
/// before the filter under test.
pub fn frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    id: u16,
    sport: u16,
) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend(dst_mac);
    f.extend(src_mac);
    f.extend(0x0800u16.to_be_bytes());
    let [id_hi, id_lo] = id.to_be_bytes();
    let mut iph = vec![0x45, 0, 0, 32, id_hi, id_lo, 0x40, 0, 64, 17, 0, 0];
    iph.extend(src.octets());
    iph.extend(dst.octets());
    let c = ipv4_checksum(&iph);
    iph[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend(iph);
    f.extend(sport.to_be_bytes());
    f.extend(9u16.to_be_bytes());
    f.extend(12u16.to_be_bytes());
    f.extend([0, 0]);
    f.extend(b"floo");
    f.resize(60, 0);
    f
}

/// The frame the live generator starts from: source `net`.0.0 with IP ID 0xffff, the state the
/// program's rewrite keeps the checksum of.
pub fn live_frame(dst_mac: [u8; 6], src_mac: [u8; 6], net: [u8; 2], dst: Ipv4Addr) -> Vec<u8> {
    frame(
        dst_mac,
        src_mac,
        Ipv4Addr::new(net[0], net[1], 0, 0),
        dst,
        0xffff,
        10_000,
    )
}

/// What `PROGRAM` does to a frame with random value `r`, for the tests (stores are
/// little-endian on the machines this runs on, as the BPF target is).
#[cfg(test)]
fn rewrite(frame: &mut [u8], r: u16) {
    let at = |o: i16| usize::try_from(o).unwrap_or(0);
    frame[at(SADDR_LOW_OFFSET)..at(SADDR_LOW_OFFSET) + 2].copy_from_slice(&r.to_le_bytes());
    frame[at(IP_ID_OFFSET)..at(IP_ID_OFFSET) + 2].copy_from_slice(&(!r).to_le_bytes());
}

fn bpf(cmd: libc::c_long, attr: *mut u8, size: usize) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` points at a live, zero-padded attribute buffer of `size` bytes whose
    // pointer fields point at live memory for the duration of the call.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr, size) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// The new descriptor a bpf(2) command returned.
fn owned(fd: libc::c_long) -> anyhow::Result<OwnedFd> {
    let fd = i32::try_from(fd)?;
    // SAFETY: the syscall just returned this descriptor, and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn put<const N: usize>(buf: &mut [u8], at: usize, bytes: [u8; N]) {
    buf[at..at + N].copy_from_slice(&bytes);
}

/// Loads `insns` as an XDP program named `name`; the verifier's log in the error if it
/// refuses.
fn load_xdp(insns: &[Insn], name: &[u8]) -> anyhow::Result<OwnedFd> {
    let license = c"Dual MIT/GPL";
    let mut log = vec![0u8; 64 * 1024];
    // union bpf_attr, BPF_PROG_LOAD: prog_type, insn_cnt, insns, license, log_level,
    // log_size, log_buf, kern_version, prog_flags, prog_name[16], prog_ifindex,
    // expected_attach_type; the rest zero.
    let mut attr = [0u8; 128];
    put(&mut attr, 0, BPF_PROG_TYPE_XDP.to_ne_bytes());
    put(&mut attr, 4, u32::try_from(insns.len())?.to_ne_bytes());
    put(&mut attr, 8, (insns.as_ptr() as u64).to_ne_bytes());
    put(&mut attr, 16, (license.as_ptr() as u64).to_ne_bytes());
    put(&mut attr, 24, 1u32.to_ne_bytes());
    put(&mut attr, 28, u32::try_from(log.len())?.to_ne_bytes());
    put(&mut attr, 32, (log.as_mut_ptr() as u64).to_ne_bytes());
    let name = &name[..name.len().min(15)];
    attr[48..48 + name.len()].copy_from_slice(name);
    match bpf(BPF_PROG_LOAD, attr.as_mut_ptr(), 72) {
        Ok(fd) => owned(fd),
        Err(e) => {
            let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
            bail!(
                "loading the XDP program {}: {e}\n{}",
                String::from_utf8_lossy(name),
                String::from_utf8_lossy(&log[..end])
            )
        }
    }
}

/// The smallest XDP program that drops: `return XDP_DROP`, no lookup, no counter.
pub const DROP_PROGRAM: [Insn; 2] = [insn(MOV64_IMM, 0, 0, 0, XDP_DROP), insn(EXIT, 0, 0, 0, 0)];

/// `DROP_PROGRAM` attached in native (driver) mode to a device; detached when dropped.
pub struct BareDrop {
    pub prog: OwnedFd,
    _link: OwnedFd,
}

impl BareDrop {
    /// Attaches to `ifindex` of the calling thread's network namespace (a bpf link: it goes
    /// away with its descriptor).
    pub fn attach(ifindex: u32) -> anyhow::Result<BareDrop> {
        let prog = load_xdp(&DROP_PROGRAM, b"bench_xdrop")?;
        // union bpf_attr, BPF_LINK_CREATE: prog_fd, target_ifindex, attach_type, flags.
        let mut attr = [0u8; 64];
        put(&mut attr, 0, u32::try_from(prog.as_raw_fd())?.to_ne_bytes());
        put(&mut attr, 4, ifindex.to_ne_bytes());
        put(&mut attr, 8, BPF_XDP.to_ne_bytes());
        put(&mut attr, 12, XDP_FLAGS_DRV_MODE.to_ne_bytes());
        match bpf(BPF_LINK_CREATE, attr.as_mut_ptr(), 16) {
            Ok(fd) => Ok(BareDrop {
                prog,
                _link: owned(fd)?,
            }),
            Err(e) => bail!("attaching a bare XDP_DROP program (native) to ifindex {ifindex}: {e}"),
        }
    }
}

/// The loaded program with kernel id `id` (as `ip -d link` shows an attached one).
pub fn program_by_id(id: u32) -> anyhow::Result<OwnedFd> {
    let mut attr = [0u8; 16];
    put(&mut attr, 0, id.to_ne_bytes());
    match bpf(BPF_PROG_GET_FD_BY_ID, attr.as_mut_ptr(), 12) {
        Ok(fd) => owned(fd),
        Err(e) => bail!("opening BPF program {id}: {e}"),
    }
}

/// An XDP program's own cost: BPF_PROG_TEST_RUN (not live: nothing is sent) of `prog` on
/// `frame` `repeat` times; (its return value, the kernel's mean ns per run).
pub fn run_cost(prog: &OwnedFd, frame: &[u8], repeat: u32) -> anyhow::Result<(u32, u32)> {
    let mut attr = [0u8; 80];
    put(&mut attr, 0, u32::try_from(prog.as_raw_fd())?.to_ne_bytes());
    put(&mut attr, 8, u32::try_from(frame.len())?.to_ne_bytes());
    put(&mut attr, 16, (frame.as_ptr() as u64).to_ne_bytes());
    put(&mut attr, 32, repeat.to_ne_bytes());
    bpf(BPF_PROG_TEST_RUN, attr.as_mut_ptr(), 76)
        .map_err(|e| anyhow::anyhow!("BPF_PROG_TEST_RUN of the program: {e}"))?;
    let word = |at: usize| u32::from_ne_bytes([attr[at], attr[at + 1], attr[at + 2], attr[at + 3]]);
    Ok((word(4), word(36)))
}

/// The loaded generator program.
pub struct Generator {
    fd: OwnedFd,
}

impl Generator {
    /// Loads `PROGRAM` as an XDP program; the verifier's log in the error if it refuses.
    pub fn load() -> anyhow::Result<Generator> {
        Ok(Generator {
            fd: load_xdp(&PROGRAM, b"bench_xgen")?,
        })
    }

    /// Sends `frame` `repeat` times out of `ifindex` (a device of the calling thread's network
    /// namespace, which must take XDP redirects) in batches of `batch` frames. Returns how many
    /// the program ran on (each one handed to the device; the device may still drop some).
    pub fn send(&self, frame: &[u8], ifindex: u32, repeat: u32, batch: u32) -> anyhow::Result<u64> {
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
        // egress_ifindex. The kernel wants data 0 and data_end the frame's length.
        let len = u32::try_from(frame.len())?;
        let mut ctx = [0u8; 24];
        put(&mut ctx, 4, len.to_ne_bytes());
        put(&mut ctx, 12, ifindex.to_ne_bytes());
        // union bpf_attr, BPF_PROG_TEST_RUN: prog_fd, retval, data_size_in, data_size_out,
        // data_in, data_out, repeat, duration, ctx_size_in, ctx_size_out, ctx_in, ctx_out,
        // flags, cpu, batch_size.
        let mut attr = [0u8; 80];
        put(
            &mut attr,
            0,
            u32::try_from(self.fd.as_raw_fd())?.to_ne_bytes(),
        );
        put(&mut attr, 8, len.to_ne_bytes());
        put(&mut attr, 16, (frame.as_ptr() as u64).to_ne_bytes());
        put(&mut attr, 32, repeat.to_ne_bytes());
        put(&mut attr, 40, 24u32.to_ne_bytes());
        put(&mut attr, 48, (ctx.as_ptr() as u64).to_ne_bytes());
        put(&mut attr, 64, BPF_F_TEST_XDP_LIVE_FRAMES.to_ne_bytes());
        put(&mut attr, 72, batch.to_ne_bytes());
        match bpf(BPF_PROG_TEST_RUN, attr.as_mut_ptr(), 76) {
            Ok(_) => Ok(u64::from(repeat)),
            // A signal or a reschedule may cut a run short; it sent an unknown part of it.
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => Ok(0),
            Err(e) => bail!("BPF_PROG_TEST_RUN with live frames on ifindex {ifindex}: {e}"),
        }
    }
}

/// Pins the calling thread to `cpu`.
pub fn pin_to_cpu(cpu: usize) -> anyhow::Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; the call reads it only.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set) != 0 {
            bail!("pinning to CPU {cpu}: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_carry_a_valid_ipv4_checksum() {
        let f = frame(
            [2; 6],
            [4; 6],
            Ipv4Addr::new(198, 18, 7, 9),
            Ipv4Addr::new(192, 168, 99, 1),
            0,
            1,
        );
        assert_eq!(f.len(), 60);
        assert!(ipv4_checksum_ok(&f[14..34]));
        let mut bad = f.clone();
        bad[14 + 15] ^= 1;
        assert!(!ipv4_checksum_ok(&bad[14..34]), "a changed source fails it");
    }

    #[test]
    fn the_programs_rewrite_keeps_the_checksum_valid_and_the_source_in_the_net() {
        let base = live_frame([2; 6], [4; 6], [198, 18], Ipv4Addr::new(192, 168, 99, 1));
        for r in [0u16, 1, 0x00ff, 0x1234, 0x8000, 0xfffe, 0xffff] {
            let mut f = base.clone();
            rewrite(&mut f, r);
            assert!(ipv4_checksum_ok(&f[14..34]), "r = {r:#x}");
            assert_eq!(&f[26..28], &[198, 18], "source stays in 198.18.0.0/16");
            assert_eq!(&f[28..30], &r.to_le_bytes());
        }
    }

    #[test]
    fn the_program_touches_only_the_checked_headers_and_ends_in_exits() {
        for i in PROGRAM.iter().filter(|i| i.code == STX_H) {
            assert!(i32::from(i.off) + 2 <= HEADERS_LEN, "{i:?}");
        }
        // The bounds check jumps to the drop branch at the end.
        let jump = PROGRAM.iter().position(|i| i.code == JGT_REG).unwrap_or(0);
        let target = jump + 1 + usize::try_from(PROGRAM[jump].off).unwrap_or(0);
        assert_eq!(PROGRAM[target], insn(MOV64_IMM, 0, 0, 0, XDP_DROP));
        assert_eq!(PROGRAM[PROGRAM.len() - 1].code, EXIT);
        assert_eq!(PROGRAM[target - 1].code, EXIT);
    }
}
