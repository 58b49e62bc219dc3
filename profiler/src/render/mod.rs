//! Views of one Capture, one file per format: folded stacks, flamegraph SVG (inferno), the
//! text summary, pprof and Prometheus text. Every view reads the same model.

pub mod chart;
mod flamegraph;
mod folded;
pub mod outputs;
pub mod pprof;
pub mod progress;
pub mod prometheus;
pub mod proto;
mod summary;

pub use flamegraph::{
    DB_STYLE, FlameStyle, OFFCPU_STYLE, ONCPU_STYLE, WALLCLOCK_STYLE, flamegraph_svg,
    write_flamegraph,
};
pub use folded::{
    GroupBy, db_folded, folded, folded_path, frame_label, group_roots, wallclock, wallclock_leaf,
};
pub use summary::{markdown_summary, summary};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Frame, FrameKind, Stack};

    fn frame(name: &str, kind: FrameKind) -> Frame {
        Frame {
            name: name.into(),
            kind,
            module: None,
            offset: None,
            inlined: false,
            unresolved: false,
        }
    }

    fn stack(tid: u32, ns: u64) -> Stack {
        Stack {
            pid: 1,
            tid,
            comm: "app".into(),
            state: "sleep".into(),
            frames: vec![
                frame("main", FrameKind::User),
                frame("wait;here", FrameKind::User),
                frame("schedule", FrameKind::Kernel),
            ],
            total_ns: ns,
            count: 1,
            intervals: vec![ns],
        }
    }

    #[test]
    fn folded_merges_threads_and_marks_kernel_frames() {
        let lines = folded(
            &[stack(1, 1_000_000), stack(2, 499), stack(3, 2_000_000)],
            |s| s.total_ns,
            1000,
        );
        assert_eq!(
            lines,
            vec!["app;main;wait:here;schedule_[k] 3000".to_string()]
        );
    }

    #[test]
    fn renders_an_svg_with_title_and_units() {
        let dir = std::env::temp_dir().join(format!("profiler-render-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.svg");
        flamegraph_svg(&["app;main;sleep_[k] 30".to_string()], &OFFCPU_STYLE, &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.contains("Off-CPU time"));
        assert!(svg.contains("main"));
        assert!(svg.contains("30 us"));
        flamegraph_svg(&[], &OFFCPU_STYLE, &path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
