fn main() { println!("{}", profiler::EBPF.len()); }
