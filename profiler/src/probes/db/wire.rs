//! The syscalls the wire decoder hooks (reads and writes of client sockets) and the
//! tracepoint field offsets it needs.

use anyhow::{Context as _, Result, bail};

use crate::probes::{Globals, global};

/// The syscalls the wire decoder hooks: (tracepoint, program), ends before starts.
pub(super) const WIRE_TRACEPOINTS: [(&str, &str); 6] = [
    ("sys_exit_read", "wire_read_return"),
    ("sys_exit_recvfrom", "wire_recvfrom_return"),
    ("sys_enter_read", "wire_read"),
    ("sys_enter_recvfrom", "wire_recvfrom"),
    ("sys_enter_write", "wire_write"),
    ("sys_enter_sendto", "wire_sendto"),
];

pub(super) fn wire_globals(globals: &mut Globals) -> Result<()> {
    let mut offsets = [None::<u32>; 4];
    for (event, _) in WIRE_TRACEPOINTS {
        let fields = crate::probes::kernel::tracefs::field_offsets("syscalls", event)?;
        let names: &[(usize, &str)] = if event.starts_with("sys_exit") {
            &[(3, "ret")]
        } else if event.ends_with("sendto") {
            &[(0, "fd"), (1, "buff"), (2, "len")]
        } else if event.ends_with("recvfrom") {
            &[(0, "fd"), (1, "ubuf"), (2, "size")]
        } else {
            &[(0, "fd"), (1, "buf"), (2, "count")]
        };
        for (slot, name) in names {
            let offset = *fields
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
