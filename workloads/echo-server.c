/*
 * echo-server: TCP echo (many clients, poll(), nonblocking, no threads) and
 * UDP echo on the same port. SIGTERM/SIGINT exit 0.
 */
#include "common.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>

#define CONN_BUF 65536

struct conn {
	int fd;
	size_t len, off;     /* pending echo bytes buf[off..len) */
	int64_t close_at;    /* --close-after-ms deadline, 0 = none */
	int wr_shut;         /* we sent FIN; discard input until peer EOF */
	char *buf;
};

static volatile sig_atomic_t g_term_req;

static void on_signal(int sig)
{
	(void)sig;
	g_term_req = 1;
}

static void usage(FILE *f)
{
	fprintf(f,
		"Usage: echo-server --port PORT [--bind ADDR] [--close-after-ms MS]\n"
		"\n"
		"TCP echo server (every byte received is sent back on the same connection;\n"
		"many concurrent clients) plus a UDP echo (each datagram is sent back to its\n"
		"sender) on the same port. Runs until SIGTERM/SIGINT (exit 0).\n"
		"Prints 'echo-server: listening on ADDR:PORT (tcp+udp)' on stdout when ready.\n"
		"\n"
		"Options:\n"
		"  --port PORT          port for TCP and UDP (0 = pick a free one)\n"
		"  --bind ADDR          IPv4 or IPv6 address to bind (default 0.0.0.0)\n"
		"  --close-after-ms MS  close each TCP connection cleanly (FIN) MS ms after\n"
		"                       accepting it (for testing clients; default: never)\n"
		"  --help               show this help\n");
}

static int set_nonblock(int fd)
{
	int fl = fcntl(fd, F_GETFL);
	return fl < 0 ? -1 : fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

static void conn_close(struct conn *c)
{
	close(c->fd);
	free(c->buf);
	c->fd = -1;
	c->buf = NULL;
}

/* Flush pending echo bytes. Returns -1 if the connection must be dropped. */
static int conn_flush(struct conn *c)
{
	while (c->off < c->len) {
		ssize_t n = send(c->fd, c->buf + c->off, c->len - c->off, MSG_NOSIGNAL);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN || errno == EWOULDBLOCK)
				return 0;
			return -1;
		}
		c->off += (size_t)n;
	}
	c->off = c->len = 0;
	return 0;
}

/* Readable: read one buffer, echo it. Returns -1 to drop the connection. */
static int conn_read(struct conn *c)
{
	char scratch[4096];

	if (c->wr_shut) {
		/* Discard until EOF so our close does not turn into a RST. */
		for (;;) {
			ssize_t n = recv(c->fd, scratch, sizeof(scratch), 0);
			if (n > 0)
				continue;
			if (n < 0 && errno == EINTR)
				continue;
			if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
				return 0;
			return -1; /* EOF or error: done */
		}
	}
	for (;;) {
		ssize_t n = recv(c->fd, c->buf, CONN_BUF, 0);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			return 0;
		if (n <= 0)
			return -1; /* EOF or reset */
		c->off = 0;
		c->len = (size_t)n;
		return conn_flush(c);
	}
}

static void begin_close(struct conn *c)
{
	/* Best effort: push what is pending, then FIN; keep reading until EOF. */
	(void)conn_flush(c);
	c->off = c->len = 0;
	shutdown(c->fd, SHUT_WR);
	c->wr_shut = 1;
	c->close_at = 0;
}

static void udp_drain(int ufd)
{
	char buf[65536];

	for (int k = 0; k < 256; k++) {
		struct sockaddr_storage from;
		socklen_t fl = sizeof(from);
		ssize_t n = recvfrom(ufd, buf, sizeof(buf), 0, (struct sockaddr *)&from, &fl);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return; /* EAGAIN, or a stray ICMP error: nothing more now */
		}
		(void)sendto(ufd, buf, (size_t)n, MSG_NOSIGNAL, (struct sockaddr *)&from, fl);
	}
}

static int make_socket(int family, int type, const struct sockaddr *sa, socklen_t sl)
{
	int one = 1;
	int fd = socket(family, type | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);

	if (fd < 0)
		die("socket: %s", strerror(errno));
	if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0)
		die("setsockopt(SO_REUSEADDR): %s", strerror(errno));
	if (family == AF_INET6)
		(void)setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
	if (bind(fd, sa, sl) < 0) {
		int e = errno;
		close(fd);
		errno = e;
		return -1;
	}
	return fd;
}

int main(int argc, char **argv)
{
	const char *bind_addr = "0.0.0.0";
	uint64_t port = 0, close_after_ms = 0;
	int have_port = 0;

	g_prog = "echo-server";
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i], *v;

		if (opt_flag(a, "--help") || opt_flag(a, "-h")) {
			usage(stdout);
			return 0;
		} else if ((v = opt_value(argc, argv, &i, "--port"))) {
			port = parse_u64_opt("--port", v, 0, 65535);
			have_port = 1;
		} else if ((v = opt_value(argc, argv, &i, "--bind"))) {
			bind_addr = v;
		} else if ((v = opt_value(argc, argv, &i, "--close-after-ms"))) {
			close_after_ms = parse_u64_opt("--close-after-ms", v, 1, 86400000ULL);
		} else {
			die_usage("unknown argument '%s'", a);
		}
	}
	if (!have_port)
		die_usage("missing required option --port");

	struct sockaddr_storage ss;
	socklen_t sl;
	int family;

	memset(&ss, 0, sizeof(ss));
	if (inet_pton(AF_INET, bind_addr, &((struct sockaddr_in *)&ss)->sin_addr) == 1) {
		family = AF_INET;
		sl = sizeof(struct sockaddr_in);
	} else if (inet_pton(AF_INET6, bind_addr, &((struct sockaddr_in6 *)&ss)->sin6_addr) == 1) {
		family = AF_INET6;
		sl = sizeof(struct sockaddr_in6);
	} else {
		die_usage("invalid --bind address '%s': expected a numeric IPv4 or IPv6 address", bind_addr);
	}
	ss.ss_family = (sa_family_t)family;

	int lfd = -1, ufd = -1;
	/* With --port 0, take the kernel's free TCP port and claim it for UDP too. */
	for (int attempt = 0; attempt < 50 && ufd < 0; attempt++) {
		if (family == AF_INET)
			((struct sockaddr_in *)&ss)->sin_port = htons((uint16_t)port);
		else
			((struct sockaddr_in6 *)&ss)->sin6_port = htons((uint16_t)port);
		lfd = make_socket(family, SOCK_STREAM, (struct sockaddr *)&ss, sl);
		if (lfd < 0)
			die("cannot bind TCP %s port %" PRIu64 ": %s", bind_addr, port, strerror(errno));
		struct sockaddr_storage got;
		socklen_t gl = sizeof(got);
		if (getsockname(lfd, (struct sockaddr *)&got, &gl) < 0)
			die("getsockname: %s", strerror(errno));
		memcpy(&ss, &got, gl);
		ufd = make_socket(family, SOCK_DGRAM, (struct sockaddr *)&ss, sl);
		if (ufd < 0) {
			if (port != 0 || errno != EADDRINUSE)
				die("cannot bind UDP %s port %" PRIu64 ": %s", bind_addr, port, strerror(errno));
			close(lfd);
			lfd = -1;
		}
	}
	if (ufd < 0)
		die("cannot find a port free for both TCP and UDP");
	if (listen(lfd, 128) < 0)
		die("listen: %s", strerror(errno));

	uint16_t actual_port = ntohs(family == AF_INET ? ((struct sockaddr_in *)&ss)->sin_port
						      : ((struct sockaddr_in6 *)&ss)->sin6_port);

	sigset_t block, wait_mask;
	struct sigaction sa;

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal;
	sigemptyset(&sa.sa_mask);
	sigemptyset(&block);
	sigaddset(&block, SIGTERM);
	sigaddset(&block, SIGINT);
	sigprocmask(SIG_BLOCK, &block, &wait_mask);
	sigdelset(&wait_mask, SIGTERM);
	sigdelset(&wait_mask, SIGINT);
	if (sigaction(SIGTERM, &sa, NULL) < 0 || sigaction(SIGINT, &sa, NULL) < 0)
		die("sigaction: %s", strerror(errno));
	signal(SIGPIPE, SIG_IGN);

	printf(family == AF_INET6 ? "echo-server: listening on [%s]:%u (tcp+udp)\n"
				  : "echo-server: listening on %s:%u (tcp+udp)\n",
	       bind_addr, actual_port);
	fflush(stdout);

	struct conn *conns = NULL;
	size_t nconns = 0, capconns = 0;
	struct pollfd *pfds = NULL;
	size_t cappfds = 0;
	int64_t accept_pause_until = 0;

	while (!g_term_req) {
		int64_t now = now_ns();
		int64_t wake = -1;

		/* Compact closed connections. */
		size_t w = 0;
		for (size_t i = 0; i < nconns; i++)
			if (conns[i].fd >= 0)
				conns[w++] = conns[i];
		nconns = w;

		if (cappfds < nconns + 2) {
			cappfds = (nconns + 2) * 2;
			pfds = realloc(pfds, cappfds * sizeof(*pfds));
			if (!pfds)
				die("out of memory");
		}
		int accepting = now >= accept_pause_until;
		pfds[0].fd = accepting ? lfd : -1;
		pfds[0].events = POLLIN;
		pfds[1].fd = ufd;
		pfds[1].events = POLLIN;
		if (!accepting)
			wake = accept_pause_until;
		for (size_t i = 0; i < nconns; i++) {
			struct conn *c = &conns[i];
			pfds[i + 2].fd = c->fd;
			pfds[i + 2].events = c->len > c->off ? POLLOUT : POLLIN;
			pfds[i + 2].revents = 0;
			if (c->close_at && (wake < 0 || c->close_at < wake))
				wake = c->close_at;
		}

		struct timespec ts, *tsp = NULL;
		if (wake >= 0) {
			ts = ns_to_ts(wake - now);
			tsp = &ts;
		}
		int rc = ppoll(pfds, nconns + 2, tsp, &wait_mask);
		if (rc < 0) {
			if (errno == EINTR)
				continue;
			die("poll: %s", strerror(errno));
		}
		now = now_ns();

		for (size_t i = 0; i < nconns; i++) {
			struct conn *c = &conns[i];
			short re = pfds[i + 2].revents;

			if (re & POLLNVAL) {
				conn_close(c);
				continue;
			}
			if (re & (POLLIN | POLLERR | POLLHUP)) {
				if (c->len > c->off) {
					if (conn_flush(c) < 0) {
						conn_close(c);
						continue;
					}
				} else if (conn_read(c) < 0) {
					conn_close(c);
					continue;
				}
			} else if (re & POLLOUT) {
				if (conn_flush(c) < 0) {
					conn_close(c);
					continue;
				}
			}
			if (c->close_at && now >= c->close_at)
				begin_close(c);
		}

		if (pfds[1].revents)
			udp_drain(ufd);

		if (pfds[0].fd >= 0 && (pfds[0].revents & POLLIN)) {
			for (;;) {
				int cfd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
				if (cfd < 0) {
					if (errno == EINTR || errno == ECONNABORTED)
						continue;
					if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
						warnmsg("accept: %s (pausing accepts for 100 ms)", strerror(errno));
						accept_pause_until = now + 100000000LL;
					}
					break;
				}
				int one = 1;
				(void)setsockopt(cfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
				char *buf = malloc(CONN_BUF);
				if (!buf || set_nonblock(cfd) < 0) {
					free(buf);
					close(cfd);
					continue;
				}
				if (nconns == capconns) {
					capconns = capconns ? capconns * 2 : 16;
					conns = realloc(conns, capconns * sizeof(*conns));
					if (!conns)
						die("out of memory");
				}
				conns[nconns].fd = cfd;
				conns[nconns].len = conns[nconns].off = 0;
				conns[nconns].close_at = close_after_ms ? now + (int64_t)close_after_ms * 1000000LL : 0;
				conns[nconns].wr_shut = 0;
				conns[nconns].buf = buf;
				nconns++;
			}
		}
	}

	for (size_t i = 0; i < nconns; i++)
		if (conns[i].fd >= 0)
			conn_close(&conns[i]);
	close(lfd);
	close(ufd);
	return 0;
}
