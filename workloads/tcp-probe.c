/*
 * tcp-probe: hold one TCP connection (or a UDP flow) to echo-server, send a
 * numbered line every interval, check the echoes and measure the longest gap
 * between consecutive correct echoes.
 */
#include "common.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>

#define LINE_MAX_LEN 256
#define OUTBUF_SIZE 65536
#define DRAIN_NS 2000000000LL      /* wait for outstanding echoes at the end */
#define CLOSE_WAIT_NS 1000000000LL /* wait for the server's FIN after ours */
#define PAUSES_KEPT 256            /* gaps over --pause-ms listed in the result (all are counted) */

static volatile sig_atomic_t g_stop_req;

static void on_signal(int sig)
{
	(void)sig;
	g_stop_req = 1;
}

struct probe {
	/* options */
	int udp, json, expect_close;
	int64_t interval_ns, duration_ns, connect_timeout_ns;
	/* socket */
	int fd;
	sigset_t wait_mask;
	/* counters */
	uint64_t sent, received, wrong, expected; /* expected: next seq (TCP) */
	int reset, eof;
	int64_t start, end, last_ok, max_gap;
	int64_t pause_ns;                 /* a gap longer than this is a pause */
	uint64_t pauses;                  /* gaps over pause_ns */
	int64_t pause_total, pause_at[PAUSES_KEPT], pause_len[PAUSES_KEPT];
	char error[256];
	/* TCP_INFO of the socket (TCP): read at every echo and right before the close */
	int have_tcpi;
	uint32_t total_retrans, retrans, lost; /* tcpi_total_retrans, tcpi_retrans, tcpi_lost */
	uint64_t retrans_gaps;                 /* gaps between echoes during which we retransmitted */
	int64_t max_retrans_gap;
	/* TCP stream state */
	char out[OUTBUF_SIZE];
	size_t out_len;
	char line[LINE_MAX_LEN];
	size_t line_len;
	int line_overflow;
	/* UDP: which seqs have been answered */
	uint8_t *seen;
	size_t seen_cap;
};

static void usage(FILE *f)
{
	fprintf(f,
		"Usage: tcp-probe --connect ADDR:PORT [--interval-ms MS] [--duration S]\n"
		"                 [--json] [--expect-close] [--udp] [--connect-timeout-ms MS]\n"
		"                 [--pause-ms MS]\n"
		"\n"
		"Hold ONE TCP connection to an echo server and send 'seq <n>\\n' every\n"
		"interval; check every echo (content, order, none missing) and measure the\n"
		"longest gap between two consecutive correct echoes. Runs for --duration\n"
		"seconds or until SIGINT/SIGTERM; then stops sending, waits up to 2 s for\n"
		"outstanding echoes and closes cleanly (shutdown + close). A reset or EOF\n"
		"from the server ends the run immediately.\n"
		"\n"
		"Result (stdout, one line; with --json a JSON object):\n"
		"  {\"sent\":N,\"received\":N,\"wrong\":N,\"max_gap_ms\":F,\"reset\":B,\"eof\":B,\n"
		"   \"duration_ms\":N,\"missing\":N,\"mode\":\"tcp\"|\"udp\",\"error\":null|\"...\",\n"
		"   \"pauses\":N,\"pause_total_ms\":F,\"pauses_ms\":[[AT_MS,LEN_MS],...]}\n"
		"Pauses: every gap between two consecutive correct echoes longer than\n"
		"--pause-ms, with when it began (ms since the start) and how long it was\n"
		"(the first 256 listed, all counted).\n"
		"TCP adds its socket's TCP_INFO, read at every echo and right before the close\n"
		"(null if never read): \"total_retrans\" (tcpi_total_retrans: segments it ever\n"
		"retransmitted), \"retrans\" and \"lost\" (tcpi_retrans, tcpi_lost at the end),\n"
		"\"retrans_gaps\" (gaps between two correct echoes during which it retransmitted,\n"
		"e.g. on a retransmission timeout) and \"max_retrans_gap_ms\" (the longest).\n"
		"Exit status: 0 if no reset, no EOF, no wrong and no missing echoes; 1 otherwise;\n"
		"2 on usage errors.\n"
		"\n"
		"Options:\n"
		"  --connect ADDR:PORT     numeric IPv4 address (or [IPv6]) and port\n"
		"  --interval-ms MS        send interval (default 10)\n"
		"  --duration S            run time in seconds (decimal allowed; default: until\n"
		"                          SIGINT/SIGTERM)\n"
		"  --json                  print the result as JSON\n"
		"  --expect-close          a clean EOF from the server is the expected outcome:\n"
		"                          exit promptly with 0 on EOF without reset/wrong echoes\n"
		"                          (and 1 if the run ends without the server closing)\n"
		"  --udp                   probe the UDP echo instead (one datagram per interval;\n"
		"                          replies may arrive in any order; no reset/EOF)\n"
		"  --connect-timeout-ms MS TCP connect timeout (default 5000)\n"
		"  --pause-ms MS           a gap longer than this is a pause (default 20)\n"
		"  --help                  show this help\n");
}

static void set_error(struct probe *p, const char *what, int err)
{
	if (!p->error[0])
		snprintf(p->error, sizeof(p->error), "%s: %s", what, strerror(err));
}

static void parse_connect(const char *s, struct sockaddr_storage *ss, socklen_t *sl)
{
	char host[128];
	const char *colon, *hs = s;
	size_t hl;

	memset(ss, 0, sizeof(*ss));
	if (s[0] == '[') {
		const char *rb = strchr(s, ']');
		if (!rb || rb[1] != ':')
			die_usage("invalid --connect '%s': expected [IPV6]:PORT", s);
		hs = s + 1;
		hl = (size_t)(rb - hs);
		colon = rb + 1;
	} else {
		colon = strrchr(s, ':');
		if (!colon)
			die_usage("invalid --connect '%s': expected ADDR:PORT", s);
		hl = (size_t)(colon - s);
	}
	if (hl == 0 || hl >= sizeof(host))
		die_usage("invalid --connect '%s': missing or overlong address", s);
	memcpy(host, hs, hl);
	host[hl] = '\0';
	uint16_t port = (uint16_t)parse_u64_opt("--connect port", colon + 1, 1, 65535);

	struct sockaddr_in *a4 = (struct sockaddr_in *)ss;
	struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)ss;
	if (inet_pton(AF_INET, host, &a4->sin_addr) == 1) {
		a4->sin_family = AF_INET;
		a4->sin_port = htons(port);
		*sl = sizeof(*a4);
	} else if (inet_pton(AF_INET6, host, &a6->sin6_addr) == 1) {
		a6->sin6_family = AF_INET6;
		a6->sin6_port = htons(port);
		*sl = sizeof(*a6);
	} else {
		die_usage("invalid --connect address '%s': expected a numeric IPv4 or [IPv6] address", host);
	}
}

/* Read the socket's retransmission counters (TCP); 1 if it retransmitted since the last read. */
static int read_tcp_info(struct probe *p)
{
	struct tcp_info ti;
	socklen_t tl = sizeof(ti);

	memset(&ti, 0, sizeof(ti));
	if (p->udp || p->fd < 0 || getsockopt(p->fd, IPPROTO_TCP, TCP_INFO, &ti, &tl) < 0)
		return 0;
	int more = p->have_tcpi && ti.tcpi_total_retrans != p->total_retrans;
	p->have_tcpi = 1;
	p->total_retrans = ti.tcpi_total_retrans;
	p->retrans = ti.tcpi_retrans;
	p->lost = ti.tcpi_lost;
	return more;
}

static void note_ok(struct probe *p, int64_t now)
{
	int retransmitted = read_tcp_info(p);

	p->received++;
	if (p->last_ok && now - p->last_ok > p->max_gap)
		p->max_gap = now - p->last_ok;
	if (p->last_ok && now - p->last_ok > p->pause_ns) {
		if (p->pauses < PAUSES_KEPT) {
			p->pause_at[p->pauses] = p->last_ok - p->start;
			p->pause_len[p->pauses] = now - p->last_ok;
		}
		p->pauses++;
		p->pause_total += now - p->last_ok;
	}
	if (p->last_ok && retransmitted) {
		p->retrans_gaps++;
		if (now - p->last_ok > p->max_retrans_gap)
			p->max_retrans_gap = now - p->last_ok;
	}
	p->last_ok = now;
}

/* Parse "seq <n>" exactly; returns 1 and *n on success. */
static int parse_seq_line(const char *s, size_t len, uint64_t *n)
{
	uint64_t v = 0;

	if (len < 5 || memcmp(s, "seq ", 4) != 0)
		return 0;
	for (size_t i = 4; i < len; i++) {
		if (s[i] < '0' || s[i] > '9' || v > (UINT64_MAX - 9) / 10)
			return 0;
		v = v * 10 + (uint64_t)(s[i] - '0');
	}
	if (len > 5 && s[4] == '0')
		return 0; /* no leading zeros */
	*n = v;
	return 1;
}

static void tcp_line(struct probe *p, int64_t now)
{
	uint64_t n;

	if (!p->line_overflow && parse_seq_line(p->line, p->line_len, &n) && n == p->expected) {
		p->expected++;
		note_ok(p, now);
		return;
	}
	p->wrong++;
	/* Resynchronise on a valid later sequence number (the skipped ones are missing). */
	if (!p->line_overflow && parse_seq_line(p->line, p->line_len, &n) && n > p->expected && n <= p->sent)
		p->expected = n + 1;
}

/* Read everything available. Returns 0 normally, -1 on EOF or error (recorded). */
static int tcp_read(struct probe *p)
{
	char buf[8192];

	for (;;) {
		ssize_t n = recv(p->fd, buf, sizeof(buf), 0);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN || errno == EWOULDBLOCK)
				return 0;
			p->reset = 1;
			set_error(p, "recv", errno);
			return -1;
		}
		if (n == 0) {
			p->eof = 1;
			return -1;
		}
		int64_t now = now_ns();
		for (ssize_t i = 0; i < n; i++) {
			char c = buf[i];
			if (c == '\n') {
				tcp_line(p, now);
				p->line_len = 0;
				p->line_overflow = 0;
			} else if (p->line_len < LINE_MAX_LEN) {
				p->line[p->line_len++] = c;
			} else {
				p->line_overflow = 1;
			}
		}
	}
}

static int tcp_flush(struct probe *p)
{
	size_t off = 0;

	while (off < p->out_len) {
		ssize_t n = send(p->fd, p->out + off, p->out_len - off, MSG_NOSIGNAL);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN || errno == EWOULDBLOCK)
				break;
			p->reset = 1;
			set_error(p, "send", errno);
			return -1;
		}
		off += (size_t)n;
	}
	memmove(p->out, p->out + off, p->out_len - off);
	p->out_len -= off;
	return 0;
}

static void udp_mark(struct probe *p, uint64_t n, int64_t now)
{
	if (n == 0 || n > p->sent || (p->seen[n / 8] & (1u << (n % 8)))) {
		p->wrong++;
		return;
	}
	p->seen[n / 8] |= (uint8_t)(1u << (n % 8));
	note_ok(p, now);
}

static void udp_read(struct probe *p)
{
	char buf[2048];

	for (;;) {
		ssize_t n = recv(p->fd, buf, sizeof(buf), 0);
		if (n < 0) {
			if (errno == EINTR || errno == ECONNREFUSED)
				continue; /* ICMP unreachable: the echo is simply missing */
			return;
		}
		uint64_t seq;
		if (n > 0 && buf[n - 1] == '\n' && parse_seq_line(buf, (size_t)n - 1, &seq))
			udp_mark(p, seq, now_ns());
		else
			p->wrong++;
	}
}

/* Queue/send the next numbered message. */
static int send_next(struct probe *p)
{
	char msg[32];
	int len = snprintf(msg, sizeof(msg), "seq %" PRIu64 "\n", p->sent + 1);

	if (p->udp) {
		size_t need = (size_t)((p->sent + 1) / 8 + 1);
		if (need > p->seen_cap) {
			size_t cap = p->seen_cap ? p->seen_cap * 2 : 4096;
			while (cap < need)
				cap *= 2;
			p->seen = realloc(p->seen, cap);
			if (!p->seen)
				die("out of memory");
			memset(p->seen + p->seen_cap, 0, cap - p->seen_cap);
			p->seen_cap = cap;
		}
		p->sent++;
		/* Errors (e.g. ECONNREFUSED after an ICMP error) just mean the echo will be missing. */
		(void)send(p->fd, msg, (size_t)len, MSG_NOSIGNAL);
		return 0;
	}
	if (p->out_len + (size_t)len > sizeof(p->out))
		return 0; /* server not reading for a long time: skip this slot */
	memcpy(p->out + p->out_len, msg, (size_t)len);
	p->out_len += (size_t)len;
	p->sent++;
	return tcp_flush(p);
}

/* Handle readiness on the socket. Returns -1 when the connection is over. */
static int handle_io(struct probe *p, short re)
{
	if (p->udp) {
		if (re)
			udp_read(p);
		return 0;
	}
	if (re & (POLLIN | POLLERR | POLLHUP)) {
		if (tcp_read(p) < 0)
			return -1;
		if (re & POLLERR) {
			int err = 0;
			socklen_t el = sizeof(err);
			getsockopt(p->fd, SOL_SOCKET, SO_ERROR, &err, &el);
			if (err) {
				p->reset = 1;
				set_error(p, "socket", err);
				return -1;
			}
		}
	}
	if ((re & POLLOUT) && p->out_len && tcp_flush(p) < 0)
		return -1;
	return 0;
}

/* ppoll on the probe socket until deadline_abs (or a signal). Returns revents. */
static short wait_io(struct probe *p, int64_t deadline_abs, int want_out)
{
	struct pollfd pfd = { .fd = p->fd, .events = POLLIN | (want_out ? POLLOUT : 0) };
	struct timespec ts = ns_to_ts(deadline_abs - now_ns());

	if (ppoll(&pfd, 1, &ts, &p->wait_mask) < 0) {
		if (errno != EINTR)
			die("poll: %s", strerror(errno));
		return 0;
	}
	return pfd.revents;
}

static void do_connect(struct probe *p, const struct sockaddr_storage *ss, socklen_t sl)
{
	int one = 1;

	p->fd = socket(ss->ss_family, (p->udp ? SOCK_DGRAM : SOCK_STREAM) | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (p->fd < 0)
		die("socket: %s", strerror(errno));
	if (!p->udp)
		(void)setsockopt(p->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	if (connect(p->fd, (const struct sockaddr *)ss, sl) == 0)
		return;
	if (errno != EINPROGRESS) {
		set_error(p, "connect", errno);
		return;
	}
	int64_t deadline = now_ns() + p->connect_timeout_ns;
	for (;;) {
		if (g_stop_req) {
			snprintf(p->error, sizeof(p->error), "connect: interrupted by signal");
			return;
		}
		if (now_ns() >= deadline) {
			snprintf(p->error, sizeof(p->error), "connect: timed out");
			return;
		}
		struct pollfd pfd = { .fd = p->fd, .events = POLLOUT };
		struct timespec ts = ns_to_ts(deadline - now_ns());
		int rc = ppoll(&pfd, 1, &ts, &p->wait_mask);
		if (rc < 0 && errno != EINTR)
			die("poll: %s", strerror(errno));
		if (rc > 0) {
			int err = 0;
			socklen_t el = sizeof(err);
			getsockopt(p->fd, SOL_SOCKET, SO_ERROR, &err, &el);
			if (err)
				set_error(p, "connect", err);
			return;
		}
	}
}

/* Stop sending; wait up to 2 s for outstanding echoes. */
static void drain(struct probe *p)
{
	int64_t deadline = now_ns() + DRAIN_NS;

	for (;;) {
		if (p->udp ? p->received >= p->sent : p->expected > p->sent)
			break; /* every message sent has been answered (or skipped past) */
		if (now_ns() >= deadline)
			break;
		short re = wait_io(p, deadline, !p->udp && p->out_len);
		if (handle_io(p, re) < 0)
			return;
	}
}

/* Clean TCP close: FIN, wait briefly for the server's FIN, close. */
static void tcp_close_clean(struct probe *p, int peer_done)
{
	char buf[4096];

	if (p->out_len)
		(void)tcp_flush(p);
	(void)read_tcp_info(p); /* before our FIN: what the run itself retransmitted */
	shutdown(p->fd, SHUT_WR);
	if (!peer_done) {
		int64_t deadline = now_ns() + CLOSE_WAIT_NS;
		while (now_ns() < deadline) {
			struct pollfd pfd = { .fd = p->fd, .events = POLLIN };
			struct timespec ts = ns_to_ts(deadline - now_ns());
			if (ppoll(&pfd, 1, &ts, NULL) <= 0)
				break;
			ssize_t n = recv(p->fd, buf, sizeof(buf), 0);
			if (n < 0 && (errno == EINTR || errno == EAGAIN))
				continue;
			if (n <= 0)
				break;
		}
	}
	close(p->fd);
	p->fd = -1;
}

static void json_str(const char *s)
{
	putchar('"');
	for (; *s; s++) {
		unsigned char c = (unsigned char)*s;
		if (c == '"' || c == '\\')
			printf("\\%c", c);
		else if (c < 0x20)
			printf("\\u%04x", c);
		else
			putchar(c);
	}
	putchar('"');
}

int main(int argc, char **argv)
{
	static struct probe P;
	struct probe *p = &P;
	const char *connect_arg = NULL;

	g_prog = "tcp-probe";
	p->interval_ns = 10 * 1000000LL;
	p->connect_timeout_ns = 5000 * 1000000LL;
	p->pause_ns = 20 * 1000000LL;
	p->fd = -1;
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i], *v;

		if (opt_flag(a, "--help") || opt_flag(a, "-h")) {
			usage(stdout);
			return 0;
		} else if ((v = opt_value(argc, argv, &i, "--connect"))) {
			connect_arg = v;
		} else if ((v = opt_value(argc, argv, &i, "--interval-ms"))) {
			p->interval_ns = (int64_t)parse_u64_opt("--interval-ms", v, 1, 3600000) * 1000000LL;
		} else if ((v = opt_value(argc, argv, &i, "--duration"))) {
			double d = parse_double_opt("--duration", v, 0.001, 1e7);
			p->duration_ns = (int64_t)(d * 1e9);
		} else if ((v = opt_value(argc, argv, &i, "--connect-timeout-ms"))) {
			p->connect_timeout_ns = (int64_t)parse_u64_opt("--connect-timeout-ms", v, 1, 3600000) * 1000000LL;
		} else if ((v = opt_value(argc, argv, &i, "--pause-ms"))) {
			p->pause_ns = (int64_t)parse_u64_opt("--pause-ms", v, 1, 3600000) * 1000000LL;
		} else if (opt_flag(a, "--json")) {
			p->json = 1;
		} else if (opt_flag(a, "--expect-close")) {
			p->expect_close = 1;
		} else if (opt_flag(a, "--udp")) {
			p->udp = 1;
		} else {
			die_usage("unknown argument '%s'", a);
		}
	}
	if (!connect_arg)
		die_usage("missing required option --connect ADDR:PORT");
	if (p->udp && p->expect_close)
		die_usage("--expect-close is meaningless with --udp");

	struct sockaddr_storage ss;
	socklen_t sl;
	parse_connect(connect_arg, &ss, &sl);

	sigset_t block;
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal;
	sigemptyset(&sa.sa_mask);
	sigemptyset(&block);
	sigaddset(&block, SIGINT);
	sigaddset(&block, SIGTERM);
	sigprocmask(SIG_BLOCK, &block, &p->wait_mask);
	sigdelset(&p->wait_mask, SIGINT);
	sigdelset(&p->wait_mask, SIGTERM);
	if (sigaction(SIGINT, &sa, NULL) < 0 || sigaction(SIGTERM, &sa, NULL) < 0)
		die("sigaction: %s", strerror(errno));
	signal(SIGPIPE, SIG_IGN);

	p->expected = 1;
	do_connect(p, &ss, sl);
	p->start = now_ns();
	int connected = !p->error[0];

	if (connected) {
		int64_t next_send = p->start;
		int64_t deadline = p->duration_ns ? p->start + p->duration_ns : INT64_MAX;
		int over = 0;

		while (!over && !g_stop_req) {
			int64_t now = now_ns();
			if (now >= deadline)
				break;
			if (now >= next_send) {
				if (send_next(p) < 0) {
					over = 1;
					break;
				}
				next_send += p->interval_ns;
				if (next_send <= now)
					next_send = now + p->interval_ns; /* we were stalled: skip, don't burst */
			}
			int64_t until = next_send < deadline ? next_send : deadline;
			short re = wait_io(p, until, !p->udp && p->out_len);
			if (handle_io(p, re) < 0)
				over = 1;
		}
		if (!over)
			drain(p);
		p->end = now_ns();
		if (!p->udp)
			tcp_close_clean(p, p->eof || p->reset);
		else
			close(p->fd);
	} else {
		p->end = p->start;
		close(p->fd);
	}

	uint64_t missing = p->sent > p->received ? p->sent - p->received : 0;
	int ok;
	if (!connected)
		ok = 0;
	else if (p->expect_close)
		ok = p->eof && !p->reset && p->wrong == 0;
	else
		ok = !p->eof && !p->reset && p->wrong == 0 && missing == 0;
	if (connected && p->expect_close && !p->eof && !p->reset && !p->error[0])
		snprintf(p->error, sizeof(p->error), "expected the server to close the connection, it did not");
	if (connected && !p->expect_close && p->eof && !p->error[0])
		snprintf(p->error, sizeof(p->error), "connection closed by the server (EOF)");

	double gap_ms = p->max_gap / 1e6;
	long long dur_ms = (long long)((p->end - p->start) / 1000000LL);
	if (p->json) {
		printf("{\"sent\":%" PRIu64 ",\"received\":%" PRIu64 ",\"wrong\":%" PRIu64
		       ",\"max_gap_ms\":%.3f,\"reset\":%s,\"eof\":%s,\"duration_ms\":%lld"
		       ",\"missing\":%" PRIu64 ",\"mode\":\"%s\"",
		       p->sent, p->received, p->wrong, gap_ms, p->reset ? "true" : "false",
		       p->eof ? "true" : "false", dur_ms, missing, p->udp ? "udp" : "tcp");
		if (p->have_tcpi)
			printf(",\"total_retrans\":%" PRIu32 ",\"retrans\":%" PRIu32 ",\"lost\":%" PRIu32
			       ",\"retrans_gaps\":%" PRIu64 ",\"max_retrans_gap_ms\":%.3f",
			       p->total_retrans, p->retrans, p->lost, p->retrans_gaps, p->max_retrans_gap / 1e6);
		else if (!p->udp)
			fputs(",\"total_retrans\":null,\"retrans\":null,\"lost\":null,\"retrans_gaps\":null"
			      ",\"max_retrans_gap_ms\":null", stdout);
		printf(",\"pauses\":%" PRIu64 ",\"pause_total_ms\":%.3f,\"pauses_ms\":[", p->pauses, p->pause_total / 1e6);
		for (uint64_t k = 0; k < p->pauses && k < PAUSES_KEPT; k++)
			printf("%s[%.3f,%.3f]", k ? "," : "", p->pause_at[k] / 1e6, p->pause_len[k] / 1e6);
		fputs("]", stdout);
		fputs(",\"error\":", stdout);
		if (p->error[0])
			json_str(p->error);
		else
			fputs("null", stdout);
		fputs("}\n", stdout);
	} else {
		printf("tcp-probe %s: %s sent=%" PRIu64 " received=%" PRIu64 " wrong=%" PRIu64
		       " missing=%" PRIu64 " max_gap_ms=%.3f pauses=%" PRIu64 " pause_total_ms=%.3f reset=%s eof=%s"
		       " duration_ms=%lld%s%s\n",
		       p->udp ? "udp" : "tcp", ok ? "OK" : "FAIL", p->sent, p->received, p->wrong, missing,
		       gap_ms, p->pauses, p->pause_total / 1e6, p->reset ? "yes" : "no", p->eof ? "yes" : "no", dur_ms,
		       p->error[0] ? " error=" : "", p->error);
	}
	fflush(stdout);
	free(p->seen);
	return ok ? 0 : 1;
}
