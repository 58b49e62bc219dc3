//! The syscalls the wire decoder hooks (reads and writes of client sockets) and the
//! tracepoint field offsets it needs.

use anyhow::{Context as _, Result, bail};

use crate::probes::{Globals, global};

/// The syscalls the wire decoder hooks: (tracepoint, program), ends before starts.
pub(super) const WIRE_TRACEPOINTS: [(&str, &str); 13] = [
    ("sys_exit_read", "wire_read_return"),
    ("sys_exit_recvfrom", "wire_recvfrom_return"),
    ("sys_exit_readv", "wire_readv_return"),
    ("sys_exit_recvmsg", "wire_recvmsg_return"),
    ("sys_enter_read", "wire_read"),
    ("sys_enter_recvfrom", "wire_recvfrom"),
    ("sys_enter_readv", "wire_readv"),
    ("sys_enter_recvmsg", "wire_recvmsg"),
    ("sys_enter_write", "wire_write"),
    ("sys_enter_sendto", "wire_sendto"),
    ("sys_enter_writev", "wire_writev"),
    ("sys_enter_sendmsg", "wire_sendmsg"),
    ("sys_enter_sendmmsg", "wire_sendmmsg"),
];

/// The fields each program reads, by the slot of the offset it reads them at (fd, buffer,
/// length, return value): the same offsets in every record, or the loader refuses.
fn fields(event: &str) -> &'static [(usize, &'static str)] {
    match event.trim_start_matches("sys_enter_") {
        _ if event.starts_with("sys_exit") => &[(3, "ret")],
        "sendto" => &[(0, "fd"), (1, "buff"), (2, "len")],
        "recvfrom" => &[(0, "fd"), (1, "ubuf"), (2, "size")],
        "writev" | "readv" => &[(0, "fd"), (1, "vec"), (2, "vlen")],
        "sendmsg" | "recvmsg" => &[(0, "fd"), (1, "msg")],
        "sendmmsg" => &[(0, "fd"), (1, "mmsg"), (2, "vlen")],
        _ => &[(0, "fd"), (1, "buf"), (2, "count")],
    }
}

pub(super) fn wire_globals(globals: &mut Globals) -> Result<()> {
    let mut offsets = [None::<u32>; 4];
    for (event, _) in WIRE_TRACEPOINTS {
        let fields_here = crate::probes::kernel::tracefs::field_offsets("syscalls", event)?;
        for (slot, name) in fields(event) {
            let offset = *fields_here
                .get(*name)
                .with_context(|| format!("syscalls:{event} has no field {name}"))?;
            if offsets[*slot].is_some_and(|o| o != offset) {
                bail!("syscalls:{event} lays out {name} unlike the other syscalls");
            }
            offsets[*slot] = Some(offset);
        }
    }
    for (slot, global_name) in [
        "TP_SYS_FD_OFF",
        "TP_SYS_BUF_OFF",
        "TP_SYS_LEN_OFF",
        "TP_SYS_RET_OFF",
    ]
    .into_iter()
    .enumerate()
    {
        global(globals, global_name, offsets[slot].expect("all set"));
    }
    Ok(())
}
