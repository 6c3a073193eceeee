/*
 * asuser: become another user and wait, for tests of tasks that are not root.
 *
 *   asuser UIDS GIDS GROUPS [RES=SOFT:HARD ...] [--stop]
 *
 * UIDS and GIDS are "R" or "R,E,S" (real, effective, saved); GROUPS is a comma
 * list of supplementary groups or "-" for none; RES is an rlimit name (nofile,
 * nproc, core, stack, fsize, data, as, memlock, locks, sigpending, msgqueue,
 * nice, rtprio, cpu, rss, rttime) and SOFT/HARD numbers or "unlimited". The
 * limits are set first (as root: lowering only), then the groups, gids and
 * uids. It then waits in pause() forever; --stop makes it SIGSTOP itself first.
 */
#include "common.h"

#include <grp.h>
#include <sys/resource.h>

static const struct { const char *name; int res; } RES[] = {
	{"cpu", RLIMIT_CPU}, {"fsize", RLIMIT_FSIZE}, {"data", RLIMIT_DATA}, {"stack", RLIMIT_STACK},
	{"core", RLIMIT_CORE}, {"rss", RLIMIT_RSS}, {"nproc", RLIMIT_NPROC}, {"nofile", RLIMIT_NOFILE},
	{"memlock", RLIMIT_MEMLOCK}, {"as", RLIMIT_AS}, {"locks", RLIMIT_LOCKS},
	{"sigpending", RLIMIT_SIGPENDING}, {"msgqueue", RLIMIT_MSGQUEUE}, {"nice", RLIMIT_NICE},
	{"rtprio", RLIMIT_RTPRIO}, {"rttime", RLIMIT_RTTIME},
};

static unsigned long num(const char *s)
{
	char *end;
	unsigned long v;

	errno = 0;
	v = strtoul(s, &end, 10);
	if (errno || end == s || *end)
		die_usage("not a number: %s", s);
	return v;
}

static void ids3(const char *s, unsigned long out[3])
{
	char buf[64], *p, *save = NULL;
	int n = 0;

	snprintf(buf, sizeof(buf), "%s", s);
	for (p = strtok_r(buf, ",", &save); p && n < 3; p = strtok_r(NULL, ",", &save))
		out[n++] = num(p);
	if (n == 1)
		out[1] = out[2] = out[0];
	else if (n != 3)
		die_usage("give one id or three (real,effective,saved): %s", s);
}

static rlim_t lim(const char *s)
{
	return strcmp(s, "unlimited") == 0 ? RLIM_INFINITY : (rlim_t)num(s);
}

static void set_limit(const char *arg)
{
	char buf[128], *eq, *colon;
	struct rlimit r;
	size_t i;

	snprintf(buf, sizeof(buf), "%s", arg);
	eq = strchr(buf, '=');
	colon = eq ? strchr(eq, ':') : NULL;
	if (!eq || !colon)
		die_usage("a limit is RES=SOFT:HARD: %s", arg);
	*eq = *colon = '\0';
	for (i = 0; i < sizeof(RES) / sizeof(RES[0]); i++)
		if (strcmp(RES[i].name, buf) == 0)
			break;
	if (i == sizeof(RES) / sizeof(RES[0]))
		die_usage("unknown limit %s", buf);
	r.rlim_cur = lim(eq + 1);
	r.rlim_max = lim(colon + 1);
	if (setrlimit(RES[i].res, &r))
		die("setrlimit %s: %s", buf, strerror(errno));
}

int main(int argc, char **argv)
{
	unsigned long uid[3], gid[3];
	gid_t groups[64];
	int i, ngroups = 0, stop = 0;

	g_prog = "asuser";
	if (argc < 4)
		die_usage("usage: asuser UIDS GIDS GROUPS [RES=SOFT:HARD ...] [--stop]");
	ids3(argv[1], uid);
	ids3(argv[2], gid);
	if (strcmp(argv[3], "-") != 0) {
		char buf[512], *p, *save = NULL;

		snprintf(buf, sizeof(buf), "%s", argv[3]);
		for (p = strtok_r(buf, ",", &save); p && ngroups < 64; p = strtok_r(NULL, ",", &save))
			groups[ngroups++] = (gid_t)num(p);
	}
	for (i = 4; i < argc; i++) {
		if (strcmp(argv[i], "--stop") == 0)
			stop = 1;
		else
			set_limit(argv[i]);
	}
	if (setgroups(ngroups, groups))
		die("setgroups: %s", strerror(errno));
	if (setresgid(gid[0], gid[1], gid[2]))
		die("setresgid: %s", strerror(errno));
	if (setresuid(uid[0], uid[1], uid[2]))
		die("setresuid: %s", strerror(errno));
	if (stop)
		raise(SIGSTOP);
	for (;;)
		pause();
}
