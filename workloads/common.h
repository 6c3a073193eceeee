/* Shared helpers for the phaul test workloads (static, dependency-free). */
#ifndef PHAUL_WORKLOADS_COMMON_H
#define PHAUL_WORKLOADS_COMMON_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* Program name used in messages; each program sets it first thing in main. */
static const char *g_prog = "workload";

/* Misuse: message + hint, exit 2. */
__attribute__((noreturn, format(printf, 1, 2)))
static inline void die_usage(const char *fmt, ...)
{
	va_list ap;
	fprintf(stderr, "%s: ", g_prog);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fprintf(stderr, "\nTry '%s --help' for more information.\n", g_prog);
	exit(2);
}

/* Runtime failure: message, exit 1. */
__attribute__((noreturn, format(printf, 1, 2)))
static inline void die(const char *fmt, ...)
{
	va_list ap;
	fprintf(stderr, "%s: ", g_prog);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(1);
}

__attribute__((format(printf, 1, 2)))
static inline void warnmsg(const char *fmt, ...)
{
	va_list ap;
	fprintf(stderr, "%s: ", g_prog);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
}

/*
 * Option matching for "--name VALUE" and "--name=VALUE".
 * Returns the value (advancing *i past it) or NULL if argv[*i] is not NAME.
 */
static inline const char *opt_value(int argc, char **argv, int *i, const char *name)
{
	const char *a = argv[*i];
	size_t n = strlen(name);

	if (strncmp(a, name, n) != 0)
		return NULL;
	if (a[n] == '=')
		return a + n + 1;
	if (a[n] != '\0')
		return NULL;
	if (*i + 1 >= argc)
		die_usage("option '%s' requires a value", name);
	*i += 1;
	return argv[*i];
}

static inline int opt_flag(const char *arg, const char *name)
{
	return strcmp(arg, name) == 0;
}

/* Strict unsigned decimal parse within [min, max]; dies with a clear message. */
static inline uint64_t parse_u64_opt(const char *opt, const char *s, uint64_t min, uint64_t max)
{
	char *end;
	unsigned long long v;

	if (s[0] == '\0' || s[0] == '-' || s[0] == '+' || s[0] == ' ')
		die_usage("invalid value '%s' for %s: expected an integer in [%" PRIu64 ", %" PRIu64 "]",
			  s, opt, min, max);
	errno = 0;
	v = strtoull(s, &end, 10);
	if (errno != 0 || *end != '\0' || v < min || v > max)
		die_usage("invalid value '%s' for %s: expected an integer in [%" PRIu64 ", %" PRIu64 "]",
			  s, opt, min, max);
	return (uint64_t)v;
}

/* Strict non-negative decimal number parse within [min, max]. */
static inline double parse_double_opt(const char *opt, const char *s, double min, double max)
{
	char *end;
	double v;

	if (s[0] == '\0' || s[0] == ' ' || s[0] == '+')
		die_usage("invalid value '%s' for %s: expected a number in [%g, %g]", s, opt, min, max);
	errno = 0;
	v = strtod(s, &end);
	if (errno != 0 || *end != '\0' || !(v >= min && v <= max))
		die_usage("invalid value '%s' for %s: expected a number in [%g, %g]", s, opt, min, max);
	return v;
}

static inline int64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static inline struct timespec ns_to_ts(int64_t ns)
{
	struct timespec ts;

	if (ns < 0)
		ns = 0;
	ts.tv_sec = ns / 1000000000LL;
	ts.tv_nsec = ns % 1000000000LL;
	return ts;
}

/* Write all of buf to fd, retrying on EINTR / short writes. 0 or -1 (errno). */
static inline int write_all(int fd, const void *buf, size_t len)
{
	const char *p = buf;

	while (len > 0) {
		ssize_t n = write(fd, p, len);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

/*
 * Atomically replace PATH with CONTENT (temp file in the same directory +
 * rename). Returns 0 or -1 with errno set.
 */
static inline int write_file_atomic(const char *path, const char *content)
{
	char tmp[PATH_MAX];
	int fd, saved;

	if (snprintf(tmp, sizeof(tmp), "%s.tmp.%ld", path, (long)getpid()) >= (int)sizeof(tmp)) {
		errno = ENAMETOOLONG;
		return -1;
	}
	fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0)
		return -1;
	if (write_all(fd, content, strlen(content)) < 0) {
		saved = errno;
		close(fd);
		unlink(tmp);
		errno = saved;
		return -1;
	}
	if (close(fd) < 0 || rename(tmp, path) < 0) {
		saved = errno;
		unlink(tmp);
		errno = saved;
		return -1;
	}
	return 0;
}

#endif /* PHAUL_WORKLOADS_COMMON_H */
