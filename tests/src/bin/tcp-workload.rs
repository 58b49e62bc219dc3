//! Test workload for the TCP family: a server thread and a client in one process, talking
//! over TCP. The server answers each request after `--delay-ms` and closes first. The client
//! connects `--conns` times, one after the other, and for each prints its own measurements
//! as one JSON line: its local port, how long connect() took, the connection's life (from
//! before connect() to after close()), the bytes it sent and received, and the kernel's
//! TCP_INFO for its socket (smoothed RTT, retransmits) read just before close(). These are the
//! oracles the tests compare the profiler with.
//!
//! `tcp-workload --addr 127.0.0.1|::1 --conns N --rounds R --delay-ms D --request Q
//! --response A` prints `ready PID`, waits for a line on stdin, works, prints
//! `server_port P` and the JSON lines, then `done`.

use std::io::{BufRead as _, Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd as _;
use std::time::{Duration, Instant};

struct Args {
    addr: IpAddr,
    conns: u32,
    rounds: u32,
    delay: Duration,
    request: usize,
    response: usize,
}

fn parse_args() -> Args {
    let mut args = Args {
        addr: "127.0.0.1".parse().expect("ip"),
        conns: 3,
        rounds: 1,
        delay: Duration::from_millis(50),
        request: 100,
        response: 1000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--addr" => args.addr = value.parse().expect("--addr IP"),
            "--conns" => args.conns = value.parse().expect("--conns N"),
            "--rounds" => args.rounds = value.parse().expect("--rounds N"),
            "--delay-ms" => args.delay = Duration::from_millis(value.parse().expect("ms")),
            "--request" => args.request = value.parse().expect("--request BYTES"),
            "--response" => args.response = value.parse().expect("--response BYTES"),
            other => panic!("unknown flag {other}"),
        }
    }
    args
}

fn serve(listener: TcpListener, args: &Args) {
    for _ in 0..args.conns {
        let (mut stream, _) = listener.accept().expect("accept");
        stream.set_nodelay(true).expect("nodelay");
        let mut request = vec![0u8; args.request];
        let response = vec![b'r'; args.response];
        for _ in 0..args.rounds {
            stream.read_exact(&mut request).expect("read request");
            std::thread::sleep(args.delay);
            stream.write_all(&response).expect("write response");
        }
        // Dropping the stream closes it: the server closes first.
    }
}

fn tcp_info(stream: &TcpStream) -> libc::tcp_info {
    // SAFETY: tcp_info is plain data; getsockopt writes at most `len` bytes.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            &mut info as *mut _ as *mut libc::c_void,
            &mut len,
        )
    };
    assert_eq!(rc, 0, "getsockopt TCP_INFO");
    info
}

fn main() {
    let args = parse_args();
    println!("ready {}", std::process::id());
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .expect("go line");

    let listener = TcpListener::bind(SocketAddr::new(args.addr, 0)).expect("bind");
    let server_addr = listener.local_addr().expect("local addr");
    println!("server_port {}", server_addr.port());
    std::thread::scope(|scope| {
        scope.spawn(|| serve(listener, &args));
        let request = vec![b'q'; args.request];
        let mut response = vec![0u8; args.response];
        for _ in 0..args.conns {
            let start = Instant::now();
            let mut stream = TcpStream::connect(server_addr).expect("connect");
            let connect_ns = start.elapsed().as_nanos() as u64;
            stream.set_nodelay(true).expect("nodelay");
            let local_port = stream.local_addr().expect("local addr").port();
            let (mut sent, mut received) = (0usize, 0usize);
            for _ in 0..args.rounds {
                stream.write_all(&request).expect("write request");
                sent += request.len();
                stream.read_exact(&mut response).expect("read response");
                received += response.len();
            }
            let mut rest = Vec::new();
            received += stream.read_to_end(&mut rest).expect("read to EOF");
            let info = tcp_info(&stream);
            drop(stream);
            let lifetime_ns = start.elapsed().as_nanos() as u64;
            println!(
                "{{\"local_port\":{local_port},\"connect_ns\":{connect_ns},\
                 \"lifetime_ns\":{lifetime_ns},\"sent\":{sent},\"received\":{received},\
                 \"rtt_us\":{},\"retransmits\":{}}}",
                info.tcpi_rtt, info.tcpi_total_retrans
            );
        }
    });
    println!("done");
}
