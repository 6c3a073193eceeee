/*
 * objects: create kernel objects, then verify every one of them periodically,
 * so a test can migrate the process tree and see which objects arrived intact.
 *
 *   objects run [--status PATH] [--interval-ms MS] NAME... | all
 *   objects list
 *   objects trylock PATH flock|posix|ofd
 *
 * `run` creates each named object, then every interval checks it and rewrites
 * the status file (atomically) with one line per object:
 *   NAME ok CHECKS            or            NAME FAIL CHECKS REASON
 * A failure is sticky: the first reason stays. Channels (pipes, sockets, ptys,
 * message queues, queued signals) always hold one message in flight, so data
 * queued at the moment of a checkpoint must arrive afterwards, in order.
 *
 * `trylock` exits 0 when the lock on PATH is held by someone else (taking it
 * fails), 3 when it could take it, 1 on another error.
 */
#include "common.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/fanotify.h>
#include <sys/file.h>
#include <sys/inotify.h>
#include <sys/ipc.h>
#include <sys/mman.h>
#include <sys/msg.h>
#include <sys/sem.h>
#include <sys/shm.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/timerfd.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <termios.h>

#define MSG_LEN 16
#define REGION 65536
#define WAIT_MS 2000
#define TCP4_PORT 7401
#define TCP6_PORT 7406
#define NTHREADS 3

static char g_err[256];
static volatile sig_atomic_t g_stop;

__attribute__((format(printf, 1, 2)))
static int fail(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(g_err, sizeof(g_err), fmt, ap);
	va_end(ap);
	return -1;
}

static int failerr(const char *what)
{
	return fail("%s: %s", what, strerror(errno));
}

static void msg_of(char *buf, unsigned seq)
{
	char tmp[MSG_LEN + 1];
	snprintf(tmp, sizeof(tmp), "OBJ%013u", seq);
	memcpy(buf, tmp, MSG_LEN);
}

static int wait_in(int fd)
{
	struct pollfd p = { .fd = fd, .events = POLLIN };
	int n;
	do
		n = poll(&p, 1, WAIT_MS);
	while (n < 0 && errno == EINTR);
	if (n < 0)
		return failerr("poll");
	if (n == 0)
		return fail("nothing to read after %d ms", WAIT_MS);
	return 0;
}

static int read_exact(int fd, char *buf, size_t len)
{
	size_t got = 0;
	while (got < len) {
		if (wait_in(fd) < 0)
			return -1;
		ssize_t n = read(fd, buf + got, len - got);
		if (n < 0 && (errno == EINTR || errno == EAGAIN))
			continue;
		if (n < 0)
			return failerr("read");
		if (n == 0)
			return fail("end of file after %zu of %zu bytes", got, len);
		got += (size_t)n;
	}
	return 0;
}

/* ---- channels: one message always in flight ------------------------------------ */

struct chan {
	int wfd, rfd;
	unsigned next, expect;
};

static int chan_init(struct chan *c, int wfd, int rfd)
{
	char m[MSG_LEN];
	c->wfd = wfd;
	c->rfd = rfd;
	c->next = 1;
	c->expect = 0;
	msg_of(m, 0);
	if (write_all(wfd, m, MSG_LEN) < 0)
		return failerr("write");
	return 0;
}

static int chan_check(struct chan *c)
{
	char m[MSG_LEN], want[MSG_LEN];
	msg_of(m, c->next);
	if (write_all(c->wfd, m, MSG_LEN) < 0)
		return failerr("write");
	c->next++;
	if (read_exact(c->rfd, m, MSG_LEN) < 0)
		return -1;
	msg_of(want, c->expect);
	if (memcmp(m, want, MSG_LEN) != 0)
		return fail("read %.16s, expected %.16s (lost or reordered)", m, want);
	c->expect++;
	return 0;
}

/* ---- pipes, FIFOs, socket pairs --------------------------------------------------- */

static struct chan c_pipe, c_fifo, c_stream, c_dgram, c_seqpacket;

static int setup_pipe(void)
{
	int p[2];
	if (pipe(p) < 0)
		return failerr("pipe");
	return chan_init(&c_pipe, p[1], p[0]);
}
static int check_pipe(void) { return chan_check(&c_pipe); }

static int setup_fifo(void)
{
	const char *path = "/tmp/obj.fifo";
	unlink(path);
	if (mkfifo(path, 0600) < 0)
		return failerr("mkfifo");
	int r = open(path, O_RDONLY | O_NONBLOCK);
	if (r < 0)
		return failerr("open fifo for reading");
	int w = open(path, O_WRONLY);
	if (w < 0)
		return failerr("open fifo for writing");
	return chan_init(&c_fifo, w, r);
}
static int check_fifo(void) { return chan_check(&c_fifo); }

static int setup_pair(struct chan *c, int type)
{
	int sv[2];
	if (socketpair(AF_UNIX, type, 0, sv) < 0)
		return failerr("socketpair");
	return chan_init(c, sv[0], sv[1]);
}
static int setup_unix_stream(void) { return setup_pair(&c_stream, SOCK_STREAM); }
static int check_unix_stream(void) { return chan_check(&c_stream); }
static int setup_unix_dgram(void) { return setup_pair(&c_dgram, SOCK_DGRAM); }
static int check_unix_dgram(void) { return chan_check(&c_dgram); }
static int setup_unix_seqpacket(void) { return setup_pair(&c_seqpacket, SOCK_SEQPACKET); }
static int check_unix_seqpacket(void) { return chan_check(&c_seqpacket); }

/* ---- UNIX sockets bound to paths --------------------------------------------------- */

static void sun_of(struct sockaddr_un *a, const char *path)
{
	memset(a, 0, sizeof(*a));
	a->sun_family = AF_UNIX;
	snprintf(a->sun_path, sizeof(a->sun_path), "%s", path);
}

/* A listener bound at `path`, one accepted connection as a channel; -1 on failure. */
static int unix_listener(const char *path, struct chan *c)
{
	struct sockaddr_un a;
	sun_of(&a, path);
	unlink(path);
	int l = socket(AF_UNIX, SOCK_STREAM, 0);
	if (l < 0 || bind(l, (struct sockaddr *)&a, sizeof(a)) < 0 || listen(l, 8) < 0)
		return failerr("bind/listen");
	int cl = socket(AF_UNIX, SOCK_STREAM, 0);
	if (cl < 0 || connect(cl, (struct sockaddr *)&a, sizeof(a)) < 0)
		return failerr("connect");
	int s = accept(l, NULL, NULL);
	if (s < 0)
		return failerr("accept");
	if (chan_init(c, cl, s) < 0)
		return -1;
	return l;
}

/* A new connection to the listener at `path` is accepted and carries a byte. */
static int unix_accepts(int l, const char *path)
{
	struct sockaddr_un a;
	char b = 0;
	int ok = -1, s = -1;
	sun_of(&a, path);
	int cl = socket(AF_UNIX, SOCK_STREAM, 0);
	if (cl < 0 || connect(cl, (struct sockaddr *)&a, sizeof(a)) < 0) {
		failerr("new connect");
		goto out;
	}
	if (wait_in(l) < 0 || (s = accept(l, NULL, NULL)) < 0) {
		if (s < 0 && !g_err[0])
			failerr("accept");
		goto out;
	}
	if (write(cl, "x", 1) != 1 || read_exact(s, &b, 1) < 0 || b != 'x') {
		if (!g_err[0])
			fail("new connection carried no byte");
		goto out;
	}
	ok = 0;
out:
	if (cl >= 0)
		close(cl);
	if (s >= 0)
		close(s);
	return ok;
}

#define UBOUND "/tmp/obj-bound.sock"
#define UDGRAM_A "/tmp/obj-dgram-a.sock"
#define UDGRAM_B "/tmp/obj-dgram-b.sock"
#define UUNLINKED "/tmp/obj-unlinked.sock"
static int l_bound = -1;
static struct chan c_bound, c_bdgram, c_unlinked;

static int setup_unix_bound(void)
{
	l_bound = unix_listener(UBOUND, &c_bound);
	return l_bound < 0 ? -1 : 0;
}
static int check_unix_bound(void)
{
	if (chan_check(&c_bound) < 0)
		return -1;
	return unix_accepts(l_bound, UBOUND);
}

static int setup_unix_bound_dgram(void)
{
	struct sockaddr_un a, b;
	sun_of(&a, UDGRAM_A);
	sun_of(&b, UDGRAM_B);
	unlink(UDGRAM_A);
	unlink(UDGRAM_B);
	int sa = socket(AF_UNIX, SOCK_DGRAM, 0), sb = socket(AF_UNIX, SOCK_DGRAM, 0);
	if (sa < 0 || sb < 0 || bind(sa, (struct sockaddr *)&a, sizeof(a)) < 0 || bind(sb, (struct sockaddr *)&b, sizeof(b)) < 0)
		return failerr("bind");
	if (connect(sa, (struct sockaddr *)&b, sizeof(b)) < 0)
		return failerr("connect");
	return chan_init(&c_bdgram, sa, sb);
}
static int check_unix_bound_dgram(void) { return chan_check(&c_bdgram); }

static int setup_unix_unlinked(void)
{
	int l = unix_listener(UUNLINKED, &c_unlinked);
	if (l < 0)
		return -1;
	if (unlink(UUNLINKED) < 0)
		return failerr("unlink");
	return 0;
}
static int check_unix_unlinked(void) { return chan_check(&c_unlinked); }

/* ---- TCP over the loopback: a connected pair and a listener ----------------------- */

struct tcp {
	int family, port, listener;
	struct chan up, down;
	struct sockaddr_storage addr;
	socklen_t addrlen;
};
static struct tcp t4 = { .family = AF_INET, .port = TCP4_PORT }, t6 = { .family = AF_INET6, .port = TCP6_PORT };

static int tcp_connect(struct tcp *t)
{
	int c = socket(t->family, SOCK_STREAM, 0);
	if (c < 0)
		return failerr("socket");
	if (connect(c, (struct sockaddr *)&t->addr, t->addrlen) < 0) {
		failerr("connect");
		close(c);
		return -1;
	}
	return c;
}

static int setup_tcp(struct tcp *t)
{
	int one = 1;
	memset(&t->addr, 0, sizeof(t->addr));
	if (t->family == AF_INET) {
		struct sockaddr_in *a = (struct sockaddr_in *)&t->addr;
		a->sin_family = AF_INET;
		a->sin_port = htons((uint16_t)t->port);
		a->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
		t->addrlen = sizeof(*a);
	} else {
		struct sockaddr_in6 *a = (struct sockaddr_in6 *)&t->addr;
		a->sin6_family = AF_INET6;
		a->sin6_port = htons((uint16_t)t->port);
		a->sin6_addr = in6addr_loopback;
		t->addrlen = sizeof(*a);
	}
	t->listener = socket(t->family, SOCK_STREAM, 0);
	if (t->listener < 0)
		return failerr("socket");
	setsockopt(t->listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(t->listener, (struct sockaddr *)&t->addr, t->addrlen) < 0 || listen(t->listener, 8) < 0)
		return failerr("bind/listen");
	int c = tcp_connect(t);
	if (c < 0)
		return -1;
	int s = accept(t->listener, NULL, NULL);
	if (s < 0)
		return failerr("accept");
	if (chan_init(&t->up, c, s) < 0 || chan_init(&t->down, s, c) < 0)
		return -1;
	return 0;
}

static int check_tcp(struct tcp *t)
{
	char b = 0;
	int ok = -1, s = -1;
	if (chan_check(&t->up) < 0 || chan_check(&t->down) < 0)
		return -1;
	int c = tcp_connect(t);
	if (c < 0)
		return -1;
	if (wait_in(t->listener) < 0)
		goto out;
	if ((s = accept(t->listener, NULL, NULL)) < 0) {
		failerr("accept");
		goto out;
	}
	if (write(c, "y", 1) != 1 || read_exact(s, &b, 1) < 0 || b != 'y') {
		if (!g_err[0])
			fail("new connection carried no byte");
		goto out;
	}
	ok = 0;
out:
	close(c);
	if (s >= 0)
		close(s);
	return ok;
}
static int setup_tcp4(void) { return setup_tcp(&t4); }
static int check_tcp4(void) { return check_tcp(&t4); }
static int setup_tcp6(void) { return setup_tcp(&t6); }
static int check_tcp6(void) { return check_tcp(&t6); }

/* ---- memory shared by name or by descriptor ----------------------------------------- */

struct region {
	unsigned char *p;
	int fd;
	uint32_t counter;
};

static void fill(unsigned char *p, unsigned char seed)
{
	for (size_t i = 8; i < REGION; i++)
		p[i] = (unsigned char)(i * 7 + seed);
}

static int verify(const unsigned char *p, unsigned char seed, struct region *r)
{
	for (size_t i = 8; i < REGION; i++)
		if (p[i] != (unsigned char)(i * 7 + seed))
			return fail("byte %zu is %u, expected %u", i, p[i], (unsigned char)(i * 7 + seed));
	uint32_t c;
	memcpy(&c, p, sizeof(c));
	if (c != r->counter)
		return fail("counter is %u, expected %u", c, r->counter);
	r->counter++;
	memcpy((unsigned char *)p, &r->counter, sizeof(r->counter));
	return 0;
}

static struct region r_sysv, r_posix, r_memfd, r_deleted;
static int shm_id = -1;

static int setup_sysv_shm(void)
{
	shm_id = shmget(IPC_PRIVATE, REGION, IPC_CREAT | 0600);
	if (shm_id < 0)
		return failerr("shmget");
	r_sysv.p = shmat(shm_id, NULL, 0);
	if (r_sysv.p == (void *)-1)
		return failerr("shmat");
	fill(r_sysv.p, 1);
	return 0;
}
static int check_sysv_shm(void)
{
	struct shmid_ds ds;
	if (shmctl(shm_id, IPC_STAT, &ds) < 0)
		return failerr("shmctl IPC_STAT");
	if (ds.shm_segsz != REGION || ds.shm_nattch < 1)
		return fail("segment size %zu, %lu attached", (size_t)ds.shm_segsz, (unsigned long)ds.shm_nattch);
	return verify(r_sysv.p, 1, &r_sysv);
}

static int sem_id = -1, sem_expect = 7;

static int setup_sysv_sem(void)
{
	sem_id = semget(IPC_PRIVATE, 1, IPC_CREAT | 0600);
	if (sem_id < 0)
		return failerr("semget");
	if (semctl(sem_id, 0, SETVAL, sem_expect) < 0)
		return failerr("semctl SETVAL");
	return 0;
}
static int check_sysv_sem(void)
{
	int v = semctl(sem_id, 0, GETVAL);
	if (v < 0)
		return failerr("semctl GETVAL");
	if (v != sem_expect)
		return fail("value %d, expected %d", v, sem_expect);
	struct sembuf op = { .sem_num = 0, .sem_op = 1, .sem_flg = 0 };
	if (semop(sem_id, &op, 1) < 0)
		return failerr("semop");
	sem_expect++;
	return 0;
}

static int msq_id = -1;
static unsigned msq_next, msq_expect;
struct qmsg {
	long mtype;
	char text[MSG_LEN];
};

static int msq_send(void)
{
	struct qmsg m = { .mtype = 1 };
	msg_of(m.text, msq_next++);
	return msgsnd(msq_id, &m, MSG_LEN, IPC_NOWAIT) < 0 ? failerr("msgsnd") : 0;
}
static int setup_sysv_msg(void)
{
	msq_id = msgget(IPC_PRIVATE, IPC_CREAT | 0600);
	if (msq_id < 0)
		return failerr("msgget");
	return msq_send();
}
static int check_sysv_msg(void)
{
	struct qmsg m;
	char want[MSG_LEN];
	if (msq_send() < 0)
		return -1;
	if (msgrcv(msq_id, &m, MSG_LEN, 0, IPC_NOWAIT) != MSG_LEN)
		return failerr("msgrcv");
	msg_of(want, msq_expect);
	if (memcmp(m.text, want, MSG_LEN) != 0)
		return fail("received %.16s, expected %.16s", m.text, want);
	msq_expect++;
	return 0;
}

static int map_fd(struct region *r, int fd, unsigned char seed)
{
	r->fd = fd;
	if (ftruncate(fd, REGION) < 0)
		return failerr("ftruncate");
	r->p = mmap(NULL, REGION, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (r->p == MAP_FAILED)
		return failerr("mmap");
	fill(r->p, seed);
	return 0;
}

/* The mapping and the descriptor see the same bytes. */
static int check_fd_region(struct region *r, unsigned char seed)
{
	unsigned char buf[64];
	if (verify(r->p, seed, r) < 0)
		return -1;
	if (pread(r->fd, buf, sizeof(buf), 0) != (ssize_t)sizeof(buf))
		return failerr("pread");
	if (memcmp(buf, r->p, sizeof(buf)) != 0)
		return fail("the descriptor and the mapping differ");
	return 0;
}

#define POSIX_SHM "/phaul-objects"
static int setup_posix_shm(void)
{
	shm_unlink(POSIX_SHM);
	int fd = shm_open(POSIX_SHM, O_CREAT | O_RDWR, 0600);
	if (fd < 0)
		return failerr("shm_open");
	return map_fd(&r_posix, fd, 2);
}
static int check_posix_shm(void)
{
	if (check_fd_region(&r_posix, 2) < 0)
		return -1;
	int fd = shm_open(POSIX_SHM, O_RDONLY, 0);  /* still there by name */
	if (fd < 0)
		return failerr("shm_open by name");
	uint32_t c = 0;
	ssize_t n = pread(fd, &c, sizeof(c), 0);
	close(fd);
	if (n != (ssize_t)sizeof(c) || c != r_posix.counter)
		return fail("by name: counter %u, expected %u", c, r_posix.counter);
	return 0;
}

static int setup_memfd(void)
{
	int fd = memfd_create("phaul-objects", MFD_CLOEXEC);
	if (fd < 0)
		return failerr("memfd_create");
	return map_fd(&r_memfd, fd, 3);
}
static int check_memfd(void) { return check_fd_region(&r_memfd, 3); }

#define DELETED "/tmp/obj-deleted"
static int setup_deleted_file(void)
{
	const char *path = DELETED;
	int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
	if (fd < 0)
		return failerr("open");
	if (map_fd(&r_deleted, fd, 4) < 0)
		return -1;
	return unlink(path) < 0 ? failerr("unlink") : 0;
}
static int check_deleted_file(void)
{
	struct stat st;
	if (fstat(r_deleted.fd, &st) < 0)
		return failerr("fstat");
	if (st.st_nlink != 0 || st.st_size != REGION)
		return fail("links %lu, size %lld", (unsigned long)st.st_nlink, (long long)st.st_size);
	/* Still deleted after a restore: not at its path, and none of the names CRIU links the
	 * file by while it restores (obj-deleted.cr.N.ghost, obj-deleted.cr_link) left over. */
	if (access(DELETED, F_OK) == 0 || errno != ENOENT)
		return fail("%s is there again", DELETED);
	DIR *d = opendir("/tmp");
	if (!d)
		return failerr("opendir /tmp");
	struct dirent *e;
	while ((e = readdir(d)))
		if (strncmp(e->d_name, "obj-deleted", strlen("obj-deleted")) == 0) {
			fail("/tmp/%s is left over", e->d_name);
			closedir(d);
			return -1;
		}
	closedir(d);
	return check_fd_region(&r_deleted, 4);
}

/* ---- notification descriptors ------------------------------------------------------- */

#define WATCH_DIR "/tmp/obj-watch"
static int in_fd = -1;
static unsigned in_seq;

static int setup_inotify(void)
{
	mkdir(WATCH_DIR, 0700);
	in_fd = inotify_init1(IN_NONBLOCK);
	if (in_fd < 0)
		return failerr("inotify_init1");
	if (inotify_add_watch(in_fd, WATCH_DIR, IN_CREATE) < 0)
		return failerr("inotify_add_watch");
	return 0;
}
static int check_inotify(void)
{
	char name[64], path[128];
	char buf[4096] __attribute__((aligned(__alignof__(struct inotify_event))));
	snprintf(name, sizeof(name), "f%u", in_seq++);
	snprintf(path, sizeof(path), WATCH_DIR "/%s", name);
	int fd = open(path, O_CREAT | O_WRONLY, 0600);
	if (fd < 0)
		return failerr("create in the watched directory");
	close(fd);
	unlink(path);
	if (wait_in(in_fd) < 0)
		return -1;
	ssize_t n = read(in_fd, buf, sizeof(buf));
	if (n < (ssize_t)sizeof(struct inotify_event))
		return failerr("read");
	struct inotify_event *ev = (struct inotify_event *)buf;
	if (!(ev->mask & IN_CREATE) || ev->len == 0 || strcmp(ev->name, name) != 0)
		return fail("event %#x for %s, expected IN_CREATE for %s", ev->mask, ev->len ? ev->name : "-", name);
	return 0;
}

/* fanotify: preflight refuses it (its marks are restored from file handles). Needs
 * fanotify_init past the seccomp profile (--seccomp unconfined, or CAP_SYS_ADMIN);
 * without CAP_SYS_ADMIN the kernel takes only FAN_REPORT_FID groups with inode marks. */
#define FAN_DIR "/tmp/obj-fan"
static int fan_fd = -1;

static int setup_fanotify(void)
{
	mkdir(FAN_DIR, 0700);
	fan_fd = fanotify_init(FAN_CLASS_NOTIF | FAN_NONBLOCK | FAN_CLOEXEC, O_RDONLY);
	if (fan_fd < 0 && errno == EPERM)
		fan_fd = fanotify_init(FAN_CLASS_NOTIF | FAN_REPORT_FID | FAN_NONBLOCK | FAN_CLOEXEC, O_RDONLY);
	if (fan_fd < 0)
		return failerr("fanotify_init");
	if (fanotify_mark(fan_fd, FAN_MARK_ADD, FAN_CLOSE_WRITE | FAN_EVENT_ON_CHILD, AT_FDCWD, FAN_DIR) < 0)
		return failerr("fanotify_mark");
	return 0;
}
static int check_fanotify(void)
{
	char buf[4096] __attribute__((aligned(__alignof__(struct fanotify_event_metadata))));
	int fd = open(FAN_DIR "/f", O_CREAT | O_WRONLY | O_TRUNC, 0600);
	if (fd < 0)
		return failerr("create in the marked directory");
	if (write(fd, "x", 1) != 1)
		return failerr("write");
	close(fd);
	if (wait_in(fan_fd) < 0)
		return -1;
	ssize_t n = read(fan_fd, buf, sizeof(buf));
	if (n < (ssize_t)sizeof(struct fanotify_event_metadata))
		return failerr("read");
	unsigned mask = 0;
	for (struct fanotify_event_metadata *m = (void *)buf; FAN_EVENT_OK(m, n); m = FAN_EVENT_NEXT(m, n)) {
		mask |= (unsigned)m->mask;
		if (m->fd >= 0)
			close(m->fd);
	}
	return mask & FAN_CLOSE_WRITE ? 0 : fail("events %#x, expected FAN_CLOSE_WRITE", mask);
}

static int ev_fd = -1;
static uint64_t ev_expect = 5;

static int setup_eventfd(void)
{
	ev_fd = eventfd(0, EFD_NONBLOCK);
	if (ev_fd < 0)
		return failerr("eventfd");
	return write(ev_fd, &ev_expect, 8) == 8 ? 0 : failerr("write");
}
static int check_eventfd(void)
{
	uint64_t v = 0;
	if (read(ev_fd, &v, 8) != 8)
		return failerr("read");
	if (v != ev_expect)
		return fail("counter %" PRIu64 ", expected %" PRIu64, v, ev_expect);
	ev_expect++;
	return write(ev_fd, &ev_expect, 8) == 8 ? 0 : failerr("write");
}

#define EPOLL_TAG 0xfeedULL
static int ep_fd = -1;

static int setup_epoll(void)
{
	uint64_t one = 1;
	int ready = eventfd(0, EFD_NONBLOCK), p[2];
	if (ready < 0 || write(ready, &one, 8) != 8 || pipe(p) < 0)
		return failerr("eventfd/pipe");
	ep_fd = epoll_create1(0);
	if (ep_fd < 0)
		return failerr("epoll_create1");
	struct epoll_event e1 = { .events = EPOLLIN, .data.u64 = EPOLL_TAG };
	struct epoll_event e2 = { .events = EPOLLIN, .data.u64 = 0xdeadULL };
	if (epoll_ctl(ep_fd, EPOLL_CTL_ADD, ready, &e1) < 0 || epoll_ctl(ep_fd, EPOLL_CTL_ADD, p[0], &e2) < 0)
		return failerr("epoll_ctl");
	return 0;
}
static int check_epoll(void)
{
	struct epoll_event ev[4];
	int n = epoll_wait(ep_fd, ev, 4, 0);
	if (n < 0)
		return failerr("epoll_wait");
	if (n != 1 || ev[0].data.u64 != EPOLL_TAG || !(ev[0].events & EPOLLIN))
		return fail("%d events (first tag %#" PRIx64 "), expected the ready eventfd only", n, n ? (uint64_t)ev[0].data.u64 : 0);
	return 0;
}

#define PERIOD_NS 100000000L
/* Short, so that it has almost always expired unread when a checkpoint freezes the task. */
#define TFD_PERIOD_NS 10000000L
static int tfd = -1;

static int setup_timerfd(void)
{
	struct itimerspec its = { .it_interval = { 0, TFD_PERIOD_NS }, .it_value = { 0, TFD_PERIOD_NS } };
	tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);
	if (tfd < 0)
		return failerr("timerfd_create");
	return timerfd_settime(tfd, 0, &its, NULL) < 0 ? failerr("timerfd_settime") : 0;
}
static int check_timerfd(void)
{
	struct itimerspec its;
	uint64_t n = 0;
	if (timerfd_gettime(tfd, &its) < 0)
		return failerr("timerfd_gettime");
	if (its.it_interval.tv_sec != 0 || its.it_interval.tv_nsec != TFD_PERIOD_NS)
		return fail("interval %ld.%09ld s, expected 0.01 s", (long)its.it_interval.tv_sec, its.it_interval.tv_nsec);
	if (wait_in(tfd) < 0)
		return -1;
	if (read(tfd, &n, 8) != 8 || n == 0)
		return failerr("read expirations");
	return 0;
}

/* Signals used below are blocked in every thread before any is created. */
#define SIG_QUEUED (SIGRTMIN + 1)
#define SIG_TIMER (SIGRTMIN + 2)
static int sfd = -1;
static int sq_next, sq_expect;

static int sig_send(void)
{
	union sigval v = { .sival_int = sq_next++ };
	return sigqueue(getpid(), SIG_QUEUED, v) < 0 ? failerr("sigqueue") : 0;
}
static int setup_signalfd(void)
{
	sigset_t s;
	sigemptyset(&s);
	sigaddset(&s, SIG_QUEUED);
	sfd = signalfd(-1, &s, SFD_NONBLOCK);
	if (sfd < 0)
		return failerr("signalfd");
	return sig_send();
}
static int check_signalfd(void)
{
	struct signalfd_siginfo si;
	if (sig_send() < 0)
		return -1;
	if (wait_in(sfd) < 0)
		return -1;
	if (read(sfd, &si, sizeof(si)) != (ssize_t)sizeof(si))
		return failerr("read");
	if ((int)si.ssi_signo != SIG_QUEUED || si.ssi_int != sq_expect)
		return fail("signal %u value %d, expected %d value %d", si.ssi_signo, si.ssi_int, SIG_QUEUED, sq_expect);
	sq_expect++;
	return 0;
}

static timer_t ptimer;

static int setup_posix_timer(void)
{
	struct sigevent sev = { .sigev_notify = SIGEV_SIGNAL, .sigev_signo = SIG_TIMER };
	struct itimerspec its = { .it_interval = { 0, PERIOD_NS }, .it_value = { 0, PERIOD_NS } };
	if (timer_create(CLOCK_MONOTONIC, &sev, &ptimer) < 0)
		return failerr("timer_create");
	return timer_settime(ptimer, 0, &its, NULL) < 0 ? failerr("timer_settime") : 0;
}
static int check_posix_timer(void)
{
	struct itimerspec its;
	sigset_t s;
	struct timespec wait = { WAIT_MS / 1000, 0 };
	if (timer_gettime(ptimer, &its) < 0)
		return failerr("timer_gettime");
	if (its.it_interval.tv_sec != 0 || its.it_interval.tv_nsec != PERIOD_NS)
		return fail("interval %ld.%09ld s, expected 0.1 s", (long)its.it_interval.tv_sec, its.it_interval.tv_nsec);
	sigemptyset(&s);
	sigaddset(&s, SIG_TIMER);
	if (sigtimedwait(&s, NULL, &wait) != SIG_TIMER)
		return failerr("sigtimedwait for the timer's signal");
	return 0;
}

/* ---- terminals ------------------------------------------------------------------------ */

static struct chan c_pty_in, c_pty_out;

static int setup_pty(void)
{
	struct termios t;
	int m = posix_openpt(O_RDWR | O_NOCTTY | O_NONBLOCK);
	if (m < 0 || grantpt(m) < 0 || unlockpt(m) < 0)
		return failerr("posix_openpt");
	const char *name = ptsname(m);
	if (name == NULL)
		return failerr("ptsname");
	int s = open(name, O_RDWR | O_NOCTTY | O_NONBLOCK);
	if (s < 0)
		return failerr("open the pty's slave");
	if (tcgetattr(s, &t) < 0)
		return failerr("tcgetattr");
	cfmakeraw(&t);
	if (tcsetattr(s, TCSANOW, &t) < 0)
		return failerr("tcsetattr");
	if (chan_init(&c_pty_in, m, s) < 0 || chan_init(&c_pty_out, s, m) < 0)
		return -1;
	return 0;
}
static int check_pty(void)
{
	if (chan_check(&c_pty_in) < 0 || chan_check(&c_pty_out) < 0)
		return -1;
	return 0;
}

/* ---- tasks ------------------------------------------------------------------------------- */

static volatile uint64_t th_count[NTHREADS];
static uint64_t th_seen[NTHREADS];

static void *spin(void *arg)
{
	volatile uint64_t *c = arg;
	struct timespec ts = { 0, 20000000L };
	for (;;) {
		(*c)++;
		nanosleep(&ts, NULL);
	}
	return NULL;
}
static int setup_threads(void)
{
	pthread_t t;
	for (int i = 0; i < NTHREADS; i++)
		if (pthread_create(&t, NULL, spin, (void *)&th_count[i]) != 0)
			return fail("pthread_create failed");
	for (int i = 0; i < NTHREADS; i++)
		while (th_count[i] == 0)
			usleep(1000);
	return 0;
}
static int count_threads(void)
{
	char buf[4096];
	int fd = open("/proc/self/status", O_RDONLY), n = -1;
	if (fd < 0)
		return -1;
	ssize_t len = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (len > 0) {
		buf[len] = 0;
		char *p = strstr(buf, "\nThreads:");
		if (p)
			n = atoi(p + 9);
	}
	return n;
}
static int check_threads(void)
{
	int n = count_threads();
	if (n != NTHREADS + 1)
		return fail("%d threads, expected %d", n, NTHREADS + 1);
	for (int i = 0; i < NTHREADS; i++) {
		uint64_t now = th_count[i];
		if (now <= th_seen[i])
			return fail("thread %d stopped at %" PRIu64, i, now);
		th_seen[i] = now;
	}
	return 0;
}

static pid_t zombie = -1;

static int setup_zombie(void)
{
	zombie = fork();
	if (zombie < 0)
		return failerr("fork");
	if (zombie == 0)
		_exit(42);
	siginfo_t si;  /* wait for it to exit, leaving it unreaped */
	if (waitid(P_PID, (id_t)zombie, &si, WEXITED | WNOWAIT) < 0)
		return failerr("waitid");
	return 0;
}
static int check_zombie(void)
{
	siginfo_t si;
	memset(&si, 0, sizeof(si));
	if (waitid(P_PID, (id_t)zombie, &si, WEXITED | WNOHANG | WNOWAIT) < 0)
		return failerr("waitid");
	if (si.si_pid != zombie)
		return fail("child %d has not exited", (int)zombie);
	if (si.si_code != CLD_EXITED || si.si_status != 42)
		return fail("child %d: code %d status %d, expected exit 42", (int)zombie, si.si_code, si.si_status);
	return 0;
}

static pid_t leader = -1, member = -1;

static int setup_session(void)
{
	int p[2];
	if (pipe(p) < 0)
		return failerr("pipe");
	leader = fork();
	if (leader < 0)
		return failerr("fork");
	if (leader == 0) {  /* a session leader with a process group of its child beside its own */
		close(p[0]);
		if (setsid() < 0)
			_exit(1);
		pid_t m = fork();
		if (m == 0) {
			setpgid(0, 0);
			for (;;)
				pause();
		}
		setpgid(m, m);
		if (write(p[1], &m, sizeof(m)) != sizeof(m))
			_exit(1);
		for (;;)
			pause();
	}
	close(p[1]);
	if (read_exact(p[0], (char *)&member, sizeof(member)) < 0)
		return -1;
	close(p[0]);
	return 0;
}
static int check_session(void)
{
	if (getsid(leader) != leader || getpgid(leader) != leader)
		return fail("leader %d: session %d, group %d", (int)leader, (int)getsid(leader), (int)getpgid(leader));
	if (getsid(member) != leader || getpgid(member) != member)
		return fail("member %d: session %d, group %d", (int)member, (int)getsid(member), (int)getpgid(member));
	if (getsid(0) == leader || getpgid(0) == member)
		return fail("this process joined the child's session or group");
	return 0;
}

/* ---- file locks ----------------------------------------------------------------------------- */

#define LOCK_FLOCK "/tmp/obj-flock"
#define LOCK_POSIX "/tmp/obj-posix"
#define LOCK_OFD "/tmp/obj-ofd"

/* 1: taking the lock through a new open file description fails (it is held), 0: it could, -1: error. */
static int lock_held(const char *path, const char *kind)
{
	struct flock fl = { .l_type = F_WRLCK, .l_whence = SEEK_SET };
	int fd = open(path, O_RDWR), r;
	if (fd < 0)
		return failerr("open");
	if (strcmp(kind, "flock") == 0)
		r = flock(fd, LOCK_EX | LOCK_NB);
	else
		r = fcntl(fd, strcmp(kind, "ofd") == 0 ? F_OFD_SETLK : F_SETLK, &fl);
	int saved = errno;
	close(fd);
	if (r == 0)
		return 0;
	if (saved == EWOULDBLOCK || saved == EAGAIN || saved == EACCES)
		return 1;
	errno = saved;
	return failerr(kind);
}

static int take(const char *path, const char *kind)
{
	struct flock fl = { .l_type = F_WRLCK, .l_whence = SEEK_SET };
	int fd = open(path, O_RDWR | O_CREAT, 0600);
	if (fd < 0)
		return failerr("open");
	if (strcmp(kind, "flock") == 0)
		return flock(fd, LOCK_EX | LOCK_NB) < 0 ? failerr("flock") : 0;
	return fcntl(fd, strcmp(kind, "ofd") == 0 ? F_OFD_SETLK : F_SETLK, &fl) < 0 ? failerr("fcntl") : 0;
}

static int setup_locks(void)
{
	if (take(LOCK_FLOCK, "flock") < 0 || take(LOCK_POSIX, "posix") < 0 || take(LOCK_OFD, "ofd") < 0)
		return -1;
	return 0;
}

static int check_locks(void)
{
	int r;
	if ((r = lock_held(LOCK_FLOCK, "flock")) != 1 || (r = lock_held(LOCK_OFD, "ofd")) != 1)
		return r < 0 ? -1 : fail("a flock or OFD lock was free");
	/* A POSIX lock does not conflict with its own process: ask another one. */
	pid_t c = fork();
	if (c < 0)
		return failerr("fork");
	if (c == 0) {
		struct flock fl = { .l_type = F_WRLCK, .l_whence = SEEK_SET };
		int fd = open(LOCK_POSIX, O_RDWR);
		if (fd < 0 || fcntl(fd, F_GETLK, &fl) < 0)
			_exit(1);
		_exit(fl.l_type == F_WRLCK && fl.l_pid == getppid() ? 0 : 2);
	}
	int st;
	if (waitpid(c, &st, 0) < 0)
		return failerr("waitpid");
	if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
		return fail("the POSIX lock is not held by this process (checker exit %d)", WIFEXITED(st) ? WEXITSTATUS(st) : -1);
	return 0;
}

/* ---- the table ------------------------------------------------------------------------------ */

struct object {
	const char *name;
	int (*setup)(void);
	int (*check)(void);
};

struct result {
	int failed;
	unsigned long checks;
	char why[256];
};

static struct object objects[] = {
	{ "pipe", setup_pipe, check_pipe },
	{ "fifo", setup_fifo, check_fifo },
	{ "unix-stream", setup_unix_stream, check_unix_stream },
	{ "unix-dgram", setup_unix_dgram, check_unix_dgram },
	{ "unix-seqpacket", setup_unix_seqpacket, check_unix_seqpacket },
	{ "unix-bound", setup_unix_bound, check_unix_bound },
	{ "unix-bound-dgram", setup_unix_bound_dgram, check_unix_bound_dgram },
	{ "unix-unlinked", setup_unix_unlinked, check_unix_unlinked },
	{ "tcp4-loopback", setup_tcp4, check_tcp4 },
	{ "tcp6-loopback", setup_tcp6, check_tcp6 },
	{ "sysv-shm", setup_sysv_shm, check_sysv_shm },
	{ "sysv-sem", setup_sysv_sem, check_sysv_sem },
	{ "sysv-msg", setup_sysv_msg, check_sysv_msg },
	{ "posix-shm", setup_posix_shm, check_posix_shm },
	{ "memfd", setup_memfd, check_memfd },
	{ "deleted-file", setup_deleted_file, check_deleted_file },
	{ "inotify", setup_inotify, check_inotify },
	{ "fanotify", setup_fanotify, check_fanotify },
	{ "eventfd", setup_eventfd, check_eventfd },
	{ "epoll", setup_epoll, check_epoll },
	{ "timerfd", setup_timerfd, check_timerfd },
	{ "signalfd", setup_signalfd, check_signalfd },
	{ "posix-timer", setup_posix_timer, check_posix_timer },
	{ "pty", setup_pty, check_pty },
	{ "threads", setup_threads, check_threads },
	{ "zombie", setup_zombie, check_zombie },
	{ "session", setup_session, check_session },
	{ "file-locks", setup_locks, check_locks },
};
#define NOBJ (sizeof(objects) / sizeof(objects[0]))
static struct result results[NOBJ];

static void write_status(const char *path, unsigned long cycles, int *chosen)
{
	static char buf[NOBJ * 320 + 64];
	size_t off = (size_t)snprintf(buf, sizeof(buf), "cycles %lu\n", cycles);
	for (size_t i = 0; i < NOBJ; i++) {
		struct result *r = &results[i];
		if (!chosen[i])
			continue;
		if (r->failed)
			off += (size_t)snprintf(buf + off, sizeof(buf) - off, "%s FAIL %lu %s\n", objects[i].name, r->checks, r->why);
		else
			off += (size_t)snprintf(buf + off, sizeof(buf) - off, "%s ok %lu\n", objects[i].name, r->checks);
	}
	if (write_file_atomic(path, buf) < 0)
		warnmsg("cannot write %s: %s", path, strerror(errno));
}

static void on_term(int sig)
{
	(void)sig;
	g_stop = 1;
}

static int run(int argc, char **argv)
{
	const char *status = "/objects.status";
	int64_t interval_ns = 500000000LL;
	int chosen[NOBJ] = { 0 }, any = 0;

	for (int i = 0; i < argc; i++) {
		const char *v;
		if ((v = opt_value(argc, argv, &i, "--status")))
			status = v;
		else if ((v = opt_value(argc, argv, &i, "--interval-ms")))
			interval_ns = (int64_t)parse_u64_opt("--interval-ms", v, 10, 60000) * 1000000LL;
		else {
			size_t k;
			for (k = 0; k < NOBJ; k++)
				if (strcmp(argv[i], "all") == 0 || strcmp(argv[i], objects[k].name) == 0)
					chosen[k] = any = 1;
			if (strcmp(argv[i], "all") != 0) {
				for (k = 0; k < NOBJ && strcmp(argv[i], objects[k].name) != 0; k++)
					;
				if (k == NOBJ)
					die_usage("unknown object '%s' (see `objects list`)", argv[i]);
			}
		}
	}
	if (!any)
		die_usage("name the objects to create, or 'all'");

	struct sigaction sa = { .sa_handler = on_term };
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);
	sigset_t block;
	sigemptyset(&block);
	sigaddset(&block, SIG_QUEUED);
	sigaddset(&block, SIG_TIMER);
	sigprocmask(SIG_BLOCK, &block, NULL);

	for (size_t i = 0; i < NOBJ; i++) {
		if (!chosen[i])
			continue;
		g_err[0] = 0;
		if (objects[i].setup() < 0) {
			results[i].failed = 1;
			snprintf(results[i].why, sizeof(results[i].why), "setup: %s", g_err);
		}
	}
	for (unsigned long cycle = 0; !g_stop; cycle++) {
		for (size_t i = 0; i < NOBJ; i++) {
			struct result *r = &results[i];
			if (!chosen[i] || r->failed)
				continue;
			g_err[0] = 0;
			if (objects[i].check() < 0) {
				r->failed = 1;
				snprintf(r->why, sizeof(r->why), "%s", g_err);
			} else {
				r->checks++;
			}
		}
		write_status(status, cycle + 1, chosen);
		struct timespec ts = ns_to_ts(interval_ns);
		nanosleep(&ts, NULL);
	}
	return 0;
}

int main(int argc, char **argv)
{
	g_prog = "objects";
	if (argc >= 2 && strcmp(argv[1], "run") == 0)
		return run(argc - 2, argv + 2);
	if (argc == 2 && strcmp(argv[1], "list") == 0) {
		for (size_t i = 0; i < NOBJ; i++)
			puts(objects[i].name);
		return 0;
	}
	if (argc == 4 && strcmp(argv[1], "trylock") == 0) {
		const char *k = argv[3];
		if (strcmp(k, "flock") && strcmp(k, "posix") && strcmp(k, "ofd"))
			die_usage("lock kind '%s': use flock, posix or ofd", k);
		int r = lock_held(argv[2], k);
		if (r < 0)
			die("%s", g_err);
		printf("%s lock on %s: %s\n", k, argv[2], r ? "held by another" : "free");
		return r ? 0 : 3;
	}
	if (argc == 2 && (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0)) {
		puts("Usage: objects run [--status PATH] [--interval-ms MS] NAME...|all\n"
		     "       objects list\n"
		     "       objects trylock PATH flock|posix|ofd");
		return 0;
	}
	die_usage("expected run, list or trylock");
}
