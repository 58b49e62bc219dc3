//! Property tests (a short fuzz run on every `cargo test`): the readers of untrusted input —
//! capture files, folded files, kernel BTF, /proc maps — return errors on garbage and never
//! panic.

use profiler::model::Capture;
use profiler::probes::kernel::btf::Btf;
use proptest::prelude::*;

const VALID_CAPTURE: &str = r#"{"format":"profiler-capture","version":1,"metadata":{"host":"h","kernel":"k","profiler_version":"0.1.0","start_unix_ms":1,"duration_ns":2000000000,"interval_ends_ns":[1000000000,2000000000],"filters":{"pids":[],"tids":[],"min_block_ns":1000,"max_block_ns":null,"state":"any","threads":"all"},"attach":"tp_btf","counters":{"blocks":3}},"offcpu":{"stacks":[{"pid":1,"tid":1,"comm":"app","state":"sleep","frames":[{"name":"main","kind":"user","module":"/bin/app","offset":16},{"name":"schedule","kind":"kernel"}],"total_ns":5000,"count":2,"intervals":[5000,0]}],"processes":[{"pid":1,"comm":"app","exe":"/bin/app","exited":false}]}}"#;

#[test]
fn the_valid_sample_is_valid() {
    Capture::from_slice(VALID_CAPTURE.as_bytes()).expect("valid sample");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn capture_reader_never_panics_on_bytes(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = Capture::from_slice(&data);
    }

    #[test]
    fn capture_reader_never_panics_on_damaged_captures(
        cut in 0..VALID_CAPTURE.len(),
        flips in proptest::collection::vec((0..VALID_CAPTURE.len(), any::<u8>()), 0..8),
    ) {
        let mut data = VALID_CAPTURE.as_bytes().to_vec();
        for (at, byte) in flips {
            data[at] = byte;
        }
        let _ = Capture::from_slice(&data);
        prop_assert!(Capture::from_slice(&VALID_CAPTURE.as_bytes()[..cut]).is_err());
    }

    #[test]
    fn folded_reader_never_panics(text in "\\PC{0,200}") {
        let _ = profiler::compare::folded::parse(&text);
    }

    #[test]
    fn folded_reader_keeps_every_valid_line(
        lines in proptest::collection::vec(("[a-z]{1,8}(;[a-z_\\[\\]]{1,8}){0,5}", 0u32..100_000), 1..20)
    ) {
        let text: String = lines.iter().map(|(p, c)| format!("{p} {c}\n")).collect();
        let parsed = profiler::compare::folded::parse(&text).unwrap();
        let total: f64 = parsed.values().sum();
        let expected: f64 = lines.iter().map(|(_, c)| *c as f64).sum();
        prop_assert_eq!(total, expected);
    }

    #[test]
    fn btf_reader_never_panics(
        header in proptest::collection::vec(any::<u32>(), 6),
        body in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        let mut data = vec![0x9f, 0xeb, 1, 0];
        data.extend_from_slice(&24u32.to_le_bytes());
        for value in &header[1..] {
            data.extend_from_slice(&(value % 512).to_le_bytes());
        }
        data.extend_from_slice(&body);
        if let Ok(btf) = Btf::parse(&data) {
            let _ = btf.member_offset("task_struct", "pid");
            let _ = btf.typedef_proto_params("btf_trace_sched_switch");
        }
    }

    #[test]
    fn maps_reader_never_panics(text in "\\PC{0,300}") {
        let _ = profiler::symbolize::procmaps::parse_maps(&text);
    }
}

/// The daemon's settings from a config file holding `text`: an error or settings, never a
/// panic.
fn settings_from_config(text: &str) -> anyhow::Result<profiler::serve::Settings> {
    use clap::Parser as _;
    let dir = std::env::temp_dir().join(format!("profiler-config-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("profiler.toml");
    std::fs::write(&path, text)?;
    let cli = profiler::cli::Cli::try_parse_from([
        "profiler".as_ref(),
        "daemon".as_ref(),
        "--config".as_ref(),
        path.as_os_str(),
    ])?;
    match cli.command {
        profiler::cli::Command::Daemon(args) => profiler::serve::settings(&args),
        _ => unreachable!("parsed as daemon"),
    }
}

#[test]
fn the_config_loader_reads_a_valid_config() {
    let settings = settings_from_config("window = \"5s\"\nkeep = 3\n").expect("valid config");
    assert_eq!(
        (settings.window, settings.keep),
        (std::time::Duration::from_secs(5), 3)
    );
    assert!(settings_from_config("window = \"0s\"\n").is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn config_loader_never_panics_on_text(text in "\\PC{0,300}") {
        let _ = settings_from_config(&text);
    }

    #[test]
    fn config_loader_never_panics_on_odd_values(
        key in "(window|keep|max_age|max_bytes|listen|allow_remote|allow_capture_get|capture_token_file|max_cpu|record|baseline|data_dir|pyroscope_url|otlp_endpoint|otlp_protocol|nope)",
        value in "(\"[^\"\\\\]{0,20}\"|\"(https?|ftp|)(://)?[a-z0-9.:%@\\[\\]/?#-]{0,24}\"|\"(grpc|http/protobuf|http)\"|-?[0-9]{1,25}|[0-9.e+-]{1,12}|true|\\[\"[a-z -]{0,12}\"\\]|\\{\\}|\"[0-9]{1,22}(ms|s|m|h|%|)\")",
    ) {
        let _ = settings_from_config(&format!("{key} = {value}\n"));
    }
}
