/*
 * memload: hold SIZE MiB of deterministic, self-verifying memory and dirty
 * it at RATE MiB/s; on SIGUSR1 verify every page and write a report.
 *
 * Page layout (4 KiB, 512 uint64 words):
 *   word 0: page index, word 1: generation, words 2..511: xorshift64 stream
 *   seeded from splitmix64(seed, index, generation).
 * A separate mapping holds one uint64 generation per page (the truth the
 * pages are checked against).
 */
#include "common.h"

#include <poll.h>
#include <sys/mman.h>

#define PAGE_SIZE_B 4096u
#define PAGE_WORDS (PAGE_SIZE_B / 8u)
#define PAGES_PER_MIB (1024u * 1024u / PAGE_SIZE_B)
#define TICK_NS 10000000LL        /* rewrite step every 10 ms */
#define MAX_CATCHUP_NS 100000000LL /* after a stall, never rewrite > 100 ms worth at once */

static volatile sig_atomic_t g_verify_req;
static volatile sig_atomic_t g_term_req;

static void on_signal(int sig)
{
	if (sig == SIGUSR1)
		g_verify_req = 1;
	else
		g_term_req = 1;
}

static inline uint64_t mix64(uint64_t z)
{
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

static inline uint64_t page_key(uint64_t seed, uint64_t idx, uint64_t gen)
{
	uint64_t k = mix64(seed + 0x9e3779b97f4a7c15ULL * (idx + 1));

	k = mix64(k ^ (0xc2b2ae3d27d4eb4fULL * (gen + 1)));
	return k ? k : 0x9e3779b97f4a7c15ULL; /* xorshift state must be non-zero */
}

static inline uint64_t xorshift64(uint64_t s)
{
	s ^= s << 13;
	s ^= s >> 7;
	s ^= s << 17;
	return s;
}

static void fill_page(uint64_t *p, uint64_t seed, uint64_t idx, uint64_t gen)
{
	uint64_t s = page_key(seed, idx, gen);

	p[0] = idx;
	p[1] = gen;
	for (unsigned k = 2; k < PAGE_WORDS; k++) {
		s = xorshift64(s);
		p[k] = s;
	}
}

struct verify_result {
	uint64_t bad_pages;
	uint64_t first_bad;
	char reason[192];
	uint64_t gen_sum;
	uint64_t checksum;
};

static void verify_all(const uint64_t *mem, const uint64_t *gens, uint64_t npages, uint64_t seed,
		       struct verify_result *r)
{
	uint64_t a = 0, b = 0; /* Fletcher-style 64-bit sums over all words */

	memset(r, 0, sizeof(*r));
	for (uint64_t i = 0; i < npages; i++) {
		const uint64_t *p = mem + i * PAGE_WORDS;
		uint64_t g = gens[i];
		char why[192];

		why[0] = '\0';
		r->gen_sum += g;
		a += p[0];
		b += a;
		a += p[1];
		b += a;
		if (p[0] != i) {
			snprintf(why, sizeof(why), "index-mismatch header_index=%" PRIu64, p[0]);
		} else if (p[1] != g) {
			snprintf(why, sizeof(why), "generation-mismatch header_generation=%" PRIu64
				 " table_generation=%" PRIu64, p[1], g);
		} else {
			uint64_t s = page_key(seed, i, g);
			uint64_t diff = 0;

			for (unsigned k = 2; k < PAGE_WORDS; k++) {
				uint64_t w = p[k];
				s = xorshift64(s);
				diff |= w ^ s;
				a += w;
				b += a;
			}
			if (diff) {
				/* Slow path: locate the first differing byte. */
				s = page_key(seed, i, g);
				for (unsigned k = 2; k < PAGE_WORDS; k++) {
					s = xorshift64(s);
					if (p[k] != s) {
						unsigned byte = 0;
						uint64_t x = p[k] ^ s;
						while (!(x & 0xff)) {
							x >>= 8;
							byte++;
						}
						snprintf(why, sizeof(why),
							 "content-mismatch offset=%u expected=%016" PRIx64
							 " got=%016" PRIx64, k * 8 + byte, s, p[k]);
						break;
					}
				}
			}
		}
		if (why[0]) {
			if (r->bad_pages == 0) {
				r->first_bad = i;
				memcpy(r->reason, why, sizeof(r->reason));
			}
			r->bad_pages++;
		}
	}
	r->checksum = mix64(a ^ mix64(b));
}

static void usage(FILE *f)
{
	fprintf(f,
		"Usage: memload --size MIB --rate MIB_PER_S [--report PATH] [--pid-file PATH]\n"
		"               [--seed N] [--verbose]\n"
		"\n"
		"Allocate SIZE MiB of anonymous memory filled with deterministic per-page\n"
		"content (derived from page index, generation and seed) and rewrite RATE MiB\n"
		"per second of it in 10 ms steps (RATE 0: only hold the memory).\n"
		"\n"
		"On SIGUSR1 every page is verified and one line is written atomically to the\n"
		"report file:\n"
		"  ok pages=N generation_sum=S checksum=HEX\n"
		"  corrupt page=I reason=WHAT [details] bad_pages=K\n"
		"SIGTERM/SIGINT exit 0. The PID file is written once the memory is filled.\n"
		"\n"
		"Options:\n"
		"  --size MIB         memory to hold, in MiB (integer, >= 1)\n"
		"  --rate MIB_PER_S   rewrite rate in MiB/s (number >= 0)\n"
		"  --report PATH      report file (default /memload.report)\n"
		"  --pid-file PATH    PID file (default /memload.pid)\n"
		"  --seed N           content seed (default 1)\n"
		"  --verbose          log verification timings to stderr\n"
		"  --help             show this help\n");
}

int main(int argc, char **argv)
{
	uint64_t size_mib = 0, seed = 1;
	double rate = -1;
	const char *report = "/memload.report", *pid_file = "/memload.pid";
	int have_size = 0, verbose = 0, self_test_corrupt = 0;

	g_prog = "memload";
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i], *v;

		if (opt_flag(a, "--help") || opt_flag(a, "-h")) {
			usage(stdout);
			return 0;
		} else if ((v = opt_value(argc, argv, &i, "--size"))) {
			size_mib = parse_u64_opt("--size", v, 1, 1ULL << 24);
			have_size = 1;
		} else if ((v = opt_value(argc, argv, &i, "--rate"))) {
			rate = parse_double_opt("--rate", v, 0, 1e6);
		} else if ((v = opt_value(argc, argv, &i, "--report"))) {
			if (!*v)
				die_usage("--report must not be empty");
			report = v;
		} else if ((v = opt_value(argc, argv, &i, "--pid-file"))) {
			if (!*v)
				die_usage("--pid-file must not be empty");
			pid_file = v;
		} else if ((v = opt_value(argc, argv, &i, "--seed"))) {
			seed = parse_u64_opt("--seed", v, 0, UINT64_MAX);
		} else if (opt_flag(a, "--verbose")) {
			verbose = 1;
		} else if (opt_flag(a, "--self-test-corrupt")) {
			/* hidden: flip one byte of one page before the first verification */
			self_test_corrupt = 1;
		} else {
			die_usage("unknown argument '%s'", a);
		}
	}
	if (!have_size)
		die_usage("missing required option --size");
	if (rate < 0)
		die_usage("missing required option --rate");

	uint64_t npages = size_mib * PAGES_PER_MIB;
	size_t mem_bytes = (size_t)(npages * PAGE_SIZE_B);
	size_t gen_bytes = (size_t)(npages * sizeof(uint64_t));

	/* Signals: blocked except while sleeping in ppoll (race-free flag check). */
	sigset_t block, sleep_mask;
	struct sigaction sa;

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal;
	sigemptyset(&sa.sa_mask);
	sigemptyset(&block);
	sigaddset(&block, SIGUSR1);
	sigaddset(&block, SIGTERM);
	sigaddset(&block, SIGINT);
	sigprocmask(SIG_BLOCK, &block, &sleep_mask);
	sigdelset(&sleep_mask, SIGUSR1);
	sigdelset(&sleep_mask, SIGTERM);
	sigdelset(&sleep_mask, SIGINT);
	if (sigaction(SIGUSR1, &sa, NULL) < 0 || sigaction(SIGTERM, &sa, NULL) < 0 ||
	    sigaction(SIGINT, &sa, NULL) < 0)
		die("sigaction: %s", strerror(errno));

	uint64_t *mem = mmap(NULL, mem_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED)
		die("cannot map %" PRIu64 " MiB: %s", size_mib, strerror(errno));
	/* 4 KiB granularity for dirty tracking even where THP is "always". */
	(void)madvise(mem, mem_bytes, MADV_NOHUGEPAGE);
	uint64_t *gens = mmap(NULL, gen_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (gens == MAP_FAILED)
		die("cannot map generation table (%zu bytes): %s", gen_bytes, strerror(errno));

	for (uint64_t i = 0; i < npages; i++) {
		gens[i] = 0;
		fill_page(mem + i * PAGE_WORDS, seed, i, 0);
	}

	char line[512];
	snprintf(line, sizeof(line), "%ld\n", (long)getpid());
	if (write_file_atomic(pid_file, line) < 0)
		die("cannot write PID file %s: %s", pid_file, strerror(errno));

	const double pages_per_ns = rate * PAGES_PER_MIB / 1e9;
	double carry = 0;
	uint64_t cursor = 0, verifications = 0;
	int64_t last = now_ns(), next = last + TICK_NS;

	for (;;) {
		if (g_term_req)
			break;
		if (g_verify_req) {
			struct verify_result r;
			int64_t t0 = now_ns();

			g_verify_req = 0;
			if (self_test_corrupt && verifications == 0) {
				unsigned char *victim = (unsigned char *)(mem + (npages / 2) * PAGE_WORDS);
				victim[100] ^= 0x01;
			}
			verifications++;
			verify_all(mem, gens, npages, seed, &r);
			if (r.bad_pages == 0)
				snprintf(line, sizeof(line),
					 "ok pages=%" PRIu64 " generation_sum=%" PRIu64 " checksum=%016" PRIx64 "\n",
					 npages, r.gen_sum, r.checksum);
			else
				snprintf(line, sizeof(line), "corrupt page=%" PRIu64 " reason=%s bad_pages=%" PRIu64 "\n",
					 r.first_bad, r.reason, r.bad_pages);
			if (write_file_atomic(report, line) < 0)
				warnmsg("cannot write report %s: %s", report, strerror(errno));
			if (verbose)
				fprintf(stderr, "memload: verified %" PRIu64 " pages in %.1f ms: %s",
					npages, (now_ns() - t0) / 1e6, line);
			continue; /* re-check flags before sleeping */
		}
		if (rate == 0) {
			ppoll(NULL, 0, NULL, &sleep_mask); /* sleep until a signal */
			continue;
		}

		int64_t now = now_ns();
		if (now < next) {
			struct timespec ts = ns_to_ts(next - now);
			ppoll(NULL, 0, &ts, &sleep_mask);
			continue;
		}

		int64_t elapsed = now - last;
		if (elapsed > MAX_CATCHUP_NS)
			elapsed = MAX_CATCHUP_NS;
		last = now;
		carry += pages_per_ns * (double)elapsed;
		uint64_t n = (uint64_t)carry;
		carry -= (double)n;
		for (uint64_t j = 0; j < n; j++) {
			uint64_t g = ++gens[cursor];
			fill_page(mem + cursor * PAGE_WORDS, seed, cursor, g);
			if (++cursor == npages)
				cursor = 0;
		}
		next += TICK_NS;
		if (next <= now)
			next = now + TICK_NS;
	}
	return 0;
}
