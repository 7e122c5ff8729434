/*
 * loadgen.c -- single-threaded epoll load generator for line-echo servers.
 *
 * Part of the trio-socketserver benchmark suite (bench/run.py builds it with
 * `cc -O2 -o bench/build/loadgen bench/loadgen.c`).  Loopback only: the host
 * must be an IPv4 address in 127.0.0.0/8.
 *
 * Modes (all print JSON on stdout, one object per line):
 *
 *   pingpong HOST PORT [--conns 32] [--seconds 5] [--size 64] [--timeout 5] [--ramp 4]
 *       N persistent connections; each sends a SIZE-byte line ending in '\n'
 *       and waits for the exact echo (verified byte for byte) before sending
 *       the next.  Connections are opened RAMP at a time; the measurement
 *       window (SECONDS) starts once every connection got its first echo
 *       (or after --connect-timeout).  Reports requests/s and latency
 *       percentiles (us) over the window.
 *
 *   connrate HOST PORT [--concurrency 16] [--seconds 5] [--size 64]
 *       Open, send one line, read + verify the echo, close; keeps
 *       CONCURRENCY connections in flight.  Reports connections/s.
 *
 *   idle HOST PORT [--conns 1000] [--ramp 16] [--serve-timeout 10]
 *                  [--hold | --hold-fd-out] [--close-timeout 20] [--hold-max 300]
 *       Opens N connections (at most RAMP connecting/awaiting their echo at
 *       once), sends one line on each and waits for its echo; a connection is
 *       "served" once echoed.  Prints {"phase":"served",...} when every
 *       connection was served/failed or SERVE_TIMEOUT elapsed.
 *       Without --hold it then exits.  With --hold (alias --hold-fd-out) it
 *       keeps every connection open, reading, until told to stop:
 *         stdin line "stop <T>"  -- T = CLOCK_MONOTONIC ns at which the server
 *                                   was told to stop (0/absent = now)
 *         stdin line "quit"      -- report immediately and exit
 *         stdin EOF / SIGTERM / SIGINT -- stop now (a second signal = quit)
 *         --hold-max seconds elapsed  -- stop now
 *       After the stop it records, per connection, when it saw EOF/reset
 *       (relative to T), until every connection is closed or CLOSE_TIMEOUT
 *       elapsed, then prints {"phase":"closed",...} and exits.
 *
 * Errors are counted per category: connect, reset, eof, timeout (no answer within --timeout),
 * bad_echo (echo differs from what was sent, or unexpected data), unanswered (a request still
 * without its echo min(--timeout, 3 s) after the measurement window ended), other.  Connection
 * attempts still handshaking when the window ends are abandoned (counted, not errors).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum { M_PINGPONG, M_CONNRATE, M_IDLE };
enum { ST_UNUSED, ST_BACKOFF, ST_CONNECTING, ST_SENDING, ST_READING, ST_HELD, ST_CLOSED };
enum { E_CONNECT, E_RESET, E_EOF, E_TIMEOUT, E_BADECHO, E_UNANSWERED, E_OTHER, E_N };
static const char *E_NAMES[E_N] = {"connect", "reset",      "eof",  "timeout",
                                   "bad_echo", "unanswered", "other"};
enum { CK_NONE, CK_EOF, CK_RESET, CK_ERROR };

#define STDIN_TAG UINT32_MAX
#define NS 1000000000LL

typedef struct {
    int fd;
    int state;
    uint32_t id;
    uint32_t events; /* currently registered epoll events (0 = not registered) */
    uint64_t seq;
    size_t out_off, in_len;
    int64_t t_op;    /* start of the current operation (connect or request) */
    int64_t t_conn;  /* start of the connection (connrate latency) */
    int64_t backoff_until;
    char *out, *in;
    unsigned char served, late_served, closed, close_kind, counted_in_window;
    int64_t close_ns;
} conn_t;

typedef struct {
    uint64_t *v;
    size_t n, cap;
} vec_t;

static struct {
    int mode;
    struct sockaddr_in addr;
    int conns, concurrency, ramp;
    size_t size;
    double seconds, timeout, connect_timeout, serve_timeout, close_timeout, hold_max;
    int hold;
} cfg;

static int epfd = -1;
static conn_t *C = NULL;
static int nconns = 0;
static uint64_t errors[E_N];
static int last_connect_errno = 0;
static volatile sig_atomic_t g_signals = 0;

static void on_signal(int s) {
    (void)s;
    g_signals++;
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * NS + ts.tv_nsec;
}

static double cpu_seconds(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

static void die(const char *msg) {
    fprintf(stderr, "loadgen: %s\n", msg);
    exit(2);
}

static void vec_push(vec_t *v, uint64_t x) {
    if (v->n == v->cap) {
        v->cap = v->cap ? v->cap * 2 : 65536;
        v->v = realloc(v->v, v->cap * sizeof(uint64_t));
        if (!v->v) die("out of memory");
    }
    v->v[v->n++] = x;
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* nearest-rank percentile of a sorted vector */
static uint64_t pct(const vec_t *v, double p) {
    if (v->n == 0) return 0;
    size_t idx = (size_t)(p * (double)v->n + 0.999999);
    if (idx < 1) idx = 1;
    if (idx > v->n) idx = v->n;
    return v->v[idx - 1];
}

/* prints {"p50":..,...} with values converted from ns by dividing by `div` */
static void print_dist(const char *name, vec_t *v, double div) {
    qsort(v->v, v->n, sizeof(uint64_t), cmp_u64);
    double sum = 0;
    for (size_t i = 0; i < v->n; i++) sum += (double)v->v[i];
    printf("\"%s\":{\"n\":%zu", name, v->n);
    if (v->n) {
        printf(",\"p50\":%.3f,\"p90\":%.3f,\"p99\":%.3f,\"p999\":%.3f,\"max\":%.3f,\"mean\":%.3f",
               pct(v, 0.50) / div, pct(v, 0.90) / div, pct(v, 0.99) / div, pct(v, 0.999) / div,
               v->v[v->n - 1] / div, sum / (double)v->n / div);
    }
    printf("}");
}

static void print_errors(void) {
    uint64_t total = 0;
    printf("\"errors\":{");
    for (int i = 0; i < E_N; i++) {
        printf("%s\"%s\":%llu", i ? "," : "", E_NAMES[i], (unsigned long long)errors[i]);
        total += errors[i];
    }
    printf("},\"errors_total\":%llu", (unsigned long long)total);
    printf(",\"last_connect_error\":\"%s\"", last_connect_errno ? strerror(last_connect_errno) : "");
}

static void print_affinity(void) {
    cpu_set_t set;
    CPU_ZERO(&set);
    printf("\"cpus\":[");
    if (sched_getaffinity(0, sizeof set, &set) == 0) {
        int first = 1;
        for (int i = 0; i < CPU_SETSIZE; i++)
            if (CPU_ISSET(i, &set)) {
                printf("%s%d", first ? "" : ",", i);
                first = 0;
            }
    }
    printf("]");
}

static void fill_payload(char *buf, size_t size, uint32_t id, uint64_t seq) {
    int n = snprintf(buf, size, "c%u s%llu ", id, (unsigned long long)seq);
    if (n < 0) n = 0;
    if ((size_t)n > size - 1) n = (int)(size - 1);
    for (size_t i = (size_t)n; i < size - 1; i++) buf[i] = (char)('a' + (i + seq + id) % 26);
    buf[size - 1] = '\n';
}

static void ep_set(conn_t *c, uint32_t ev) {
    if (c->events == ev) return;
    struct epoll_event e = {.events = ev, .data.u32 = c->id};
    if (epoll_ctl(epfd, c->events ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, c->fd, &e) < 0)
        die("epoll_ctl failed");
    c->events = ev;
}

static void conn_close(conn_t *c) {
    if (c->fd >= 0) close(c->fd); /* close() also drops the epoll registration */
    c->fd = -1;
    c->events = 0;
    c->in_len = 0;
    c->out_off = 0;
}

static int errno_category(int e) {
    switch (e) {
    case ECONNRESET:
    case EPIPE:
    case ECONNABORTED:
        return E_RESET;
    case ETIMEDOUT:
        return E_TIMEOUT;
    default:
        return E_OTHER;
    }
}

/* returns 0 if a connection attempt is under way, -1 on immediate failure */
static int conn_connect(conn_t *c, int64_t now) {
    c->in_len = 0;
    c->out_off = 0;
    c->t_op = c->t_conn = now;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        last_connect_errno = errno;
        errors[E_CONNECT]++;
        return -1;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->fd = fd;
    c->events = 0;
    if (connect(fd, (struct sockaddr *)&cfg.addr, sizeof cfg.addr) < 0 && errno != EINPROGRESS) {
        last_connect_errno = errno;
        errors[E_CONNECT]++;
        conn_close(c);
        return -1;
    }
    c->state = ST_CONNECTING;
    ep_set(c, EPOLLOUT);
    return 0;
}

/* -1 on error (already counted), 0 otherwise */
static int conn_flush(conn_t *c) {
    while (c->out_off < cfg.size) {
        ssize_t n = send(c->fd, c->out + c->out_off, cfg.size - c->out_off, MSG_NOSIGNAL);
        if (n > 0) {
            c->out_off += (size_t)n;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            c->state = ST_SENDING;
            ep_set(c, EPOLLOUT);
            return 0;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else {
            errors[errno_category(errno)]++;
            return -1;
        }
    }
    c->state = ST_READING;
    ep_set(c, EPOLLIN);
    return 0;
}

static int conn_send_request(conn_t *c, int64_t now) {
    c->seq++;
    fill_payload(c->out, cfg.size, c->id, c->seq);
    c->out_off = 0;
    c->in_len = 0;
    c->t_op = now;
    return conn_flush(c);
}

/* 1 = full verified echo received, 0 = need more, -1 = error (counted) */
static int conn_recv(conn_t *c, int *close_kind) {
    for (;;) {
        ssize_t n = recv(c->fd, c->in + c->in_len, cfg.size - c->in_len, 0);
        if (n > 0) {
            c->in_len += (size_t)n;
            if (c->in_len < cfg.size) continue;
            if (memcmp(c->in, c->out, cfg.size) != 0) {
                errors[E_BADECHO]++;
                *close_kind = CK_ERROR;
                return -1;
            }
            return 1;
        }
        if (n == 0) {
            errors[E_EOF]++;
            *close_kind = CK_EOF;
            return -1;
        }
        if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
        if (errno == EINTR) continue;
        int cat = errno_category(errno);
        errors[cat]++;
        *close_kind = cat == E_RESET ? CK_RESET : CK_ERROR;
        return -1;
    }
}

/* completes a non-blocking connect; 0 = connected, -1 = failed (counted) */
static int conn_finish_connect(conn_t *c) {
    int err = 0;
    socklen_t len = sizeof err;
    if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) err = errno;
    if (err) {
        last_connect_errno = err;
        errors[E_CONNECT]++;
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------ stdin */

static char stdin_buf[4096];
static size_t stdin_len = 0;
static int stdin_registered = 0;

/* returns: 0 nothing, 1 stop (sets *t_stop), 2 quit, 3 eof */
static int read_stdin(int64_t *t_stop) {
    ssize_t n = read(0, stdin_buf + stdin_len, sizeof stdin_buf - 1 - stdin_len);
    if (n == 0) return 3;
    if (n < 0) return (errno == EAGAIN || errno == EINTR) ? 0 : 3;
    stdin_len += (size_t)n;
    stdin_buf[stdin_len] = 0;
    int result = 0;
    char *line = stdin_buf, *nl;
    while ((nl = strchr(line, '\n')) != NULL) {
        *nl = 0;
        if (strncmp(line, "stop", 4) == 0 && result == 0) {
            long long t = 0;
            if (sscanf(line + 4, "%lld", &t) != 1 || t <= 0) t = now_ns();
            *t_stop = t;
            result = 1;
        } else if (strncmp(line, "quit", 4) == 0) {
            result = 2;
        }
        line = nl + 1;
    }
    size_t rest = stdin_len - (size_t)(line - stdin_buf);
    memmove(stdin_buf, line, rest);
    stdin_len = rest;
    if (stdin_len == sizeof stdin_buf - 1) stdin_len = 0; /* garbage, drop */
    return result;
}

static void register_stdin(void) {
    int fl = fcntl(0, F_GETFL);
    if (fl < 0) return;
    fcntl(0, F_SETFL, fl | O_NONBLOCK);
    struct epoll_event e = {.events = EPOLLIN, .data.u32 = STDIN_TAG};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, 0, &e) == 0) stdin_registered = 1;
}

/* --------------------------------------------------------- pingpong/connrate */

static int run_load(void) {
    int persistent = cfg.mode == M_PINGPONG;
    nconns = persistent ? cfg.conns : cfg.concurrency;
    C = calloc((size_t)nconns, sizeof(conn_t));
    for (int i = 0; i < nconns; i++) {
        C[i].id = (uint32_t)i;
        C[i].fd = -1;
        C[i].out = malloc(cfg.size);
        C[i].in = malloc(cfg.size);
        if (!C[i].out || !C[i].in) die("out of memory");
    }
    vec_t lat = {0};
    uint64_t done_in_window = 0, reconnects = 0, started_conns = 0, abandoned = 0;
    int64_t t_begin = now_ns();
    int64_t connect_deadline = t_begin + (int64_t)(cfg.connect_timeout * NS);
    int64_t t_rec = 0, t_end = 0, drain_deadline = 0;
    int recording = 0, draining = 0;
    double cpu0 = 0, cpu1 = 0;
    int64_t wall_end = 0;
    int64_t timeout_ns = (int64_t)(cfg.timeout * NS);
    int64_t backoff_ns = 10 * 1000000LL;

    /* pingpong: connections are opened at most `ramp` at a time and count as ready after
     * their first echo; the measurement window starts once all are ready (so a small accept
     * backlog does not leave connections unaccepted during the window). */
    int launched = 0, ready = 0;
    if (!persistent) {
        for (int i = 0; i < nconns; i++) {
            started_conns++;
            if (conn_connect(&C[i], t_begin) < 0) {
                C[i].state = ST_BACKOFF;
                C[i].backoff_until = t_begin + backoff_ns;
            }
        }
        launched = nconns;
    }
    if (!persistent) { /* connrate records from the first connection on */
        recording = 1;
        t_rec = t_begin;
        t_end = t_rec + (int64_t)(cfg.seconds * NS);
        cpu0 = cpu_seconds();
    }

    struct epoll_event evs[256];
    int64_t next_scan = 0;
    for (;;) {
        int64_t now = now_ns();
        if (g_signals && !draining) {
            t_end = now; /* stop early on a signal, still report */
        }
        while (persistent && launched < nconns &&
               (recording || launched - ready < cfg.ramp)) {
            conn_t *c = &C[launched++];
            started_conns++;
            if (conn_connect(c, now) < 0) {
                c->state = ST_BACKOFF;
                c->backoff_until = now + backoff_ns;
            }
        }
        if (persistent && !recording) {
            if (ready == nconns || now >= connect_deadline) {
                recording = 1;
                t_rec = now;
                t_end = t_rec + (int64_t)(cfg.seconds * NS);
                cpu0 = cpu_seconds();
            }
        }
        if (recording && !draining && now >= t_end) {
            draining = 1;
            wall_end = now;
            cpu1 = cpu_seconds();
            /* let in-flight requests finish cleanly (bounded); connection attempts that are
             * still handshaking are abandoned: nothing was sent on them yet */
            int64_t drain_ns = cfg.timeout < 3.0 ? (int64_t)(cfg.timeout * NS) : 3 * NS;
            drain_deadline = now + drain_ns;
            for (int i = 0; i < nconns; i++) {
                if (C[i].state == ST_CONNECTING) {
                    conn_close(&C[i]);
                    C[i].state = ST_CLOSED;
                    abandoned++;
                }
            }
        }
        if (draining) {
            int busy = 0;
            for (int i = 0; i < nconns; i++) {
                if (C[i].state == ST_CONNECTING || C[i].state == ST_SENDING ||
                    C[i].state == ST_READING)
                    busy++;
                else if (C[i].state == ST_BACKOFF)
                    C[i].state = ST_CLOSED;
            }
            if (busy == 0 || now >= drain_deadline) break;
        }
        if (now >= next_scan) {
            next_scan = now + 20 * 1000000LL;
            for (int i = 0; i < nconns; i++) {
                conn_t *c = &C[i];
                if (c->state == ST_BACKOFF && !draining && now >= c->backoff_until) {
                    reconnects++;
                    started_conns++;
                    if (conn_connect(c, now) < 0) c->backoff_until = now + backoff_ns;
                } else if ((c->state == ST_CONNECTING || c->state == ST_SENDING ||
                            c->state == ST_READING) &&
                           !draining && now - c->t_op > timeout_ns) {
                    errors[E_TIMEOUT]++;
                    conn_close(c);
                    c->state = ST_BACKOFF;
                    c->backoff_until = now;
                }
            }
        }
        int n = epoll_wait(epfd, evs, 256, 10);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait failed");
        }
        now = now_ns();
        for (int k = 0; k < n; k++) {
            conn_t *c = &C[evs[k].data.u32];
            int rc = 0, ck = CK_NONE;
            if (c->fd < 0) continue;
            if (c->state == ST_CONNECTING) {
                rc = conn_finish_connect(c);
                if (rc == 0) {
                    if (draining && persistent) {
                        conn_close(c);
                        c->state = ST_CLOSED;
                        continue;
                    }
                    rc = conn_send_request(c, now);
                }
            } else if (c->state == ST_SENDING) {
                rc = conn_flush(c);
            } else if (c->state == ST_READING) {
                rc = conn_recv(c, &ck);
                if (rc == 1) {
                    uint64_t ns = (uint64_t)(now - (persistent ? c->t_op : c->t_conn));
                    if (recording && !draining && now >= t_rec) {
                        vec_push(&lat, ns);
                        done_in_window++;
                    }
                    if (persistent) {
                        if (!c->served) {
                            c->served = 1;
                            ready++;
                        }
                        if (draining) {
                            conn_close(c);
                            c->state = ST_CLOSED;
                            continue;
                        }
                        rc = conn_send_request(c, now);
                    } else {
                        conn_close(c);
                        c->state = ST_CLOSED;
                        if (draining) continue;
                        started_conns++;
                        if (conn_connect(c, now) < 0) {
                            c->state = ST_BACKOFF;
                            c->backoff_until = now + backoff_ns;
                        }
                        continue;
                    }
                }
            }
            if (rc < 0) {
                conn_close(c);
                if (draining) {
                    c->state = ST_CLOSED;
                } else {
                    c->state = ST_BACKOFF;
                    c->backoff_until = now + backoff_ns;
                }
            }
        }
    }
    int64_t t_done = now_ns();
    int outstanding = 0;
    for (int i = 0; i < nconns; i++) {
        if (C[i].state == ST_CONNECTING || C[i].state == ST_SENDING || C[i].state == ST_READING) {
            outstanding++;
            errors[E_UNANSWERED]++; /* still unanswered after the drain period */
        }
        conn_close(&C[i]);
    }
    if (!recording) { /* never got going (e.g. connect deadline not reached) */
        t_rec = t_begin;
        wall_end = now_ns();
        cpu0 = 0;
        cpu1 = cpu_seconds();
    }
    if (!wall_end) {
        wall_end = now_ns();
        cpu1 = cpu_seconds();
    }
    double wall = (double)(wall_end - t_rec) / NS;
    double rate = wall > 0 ? (double)done_in_window / wall : 0;
    printf("{\"mode\":\"%s\",", persistent ? "pingpong" : "connrate");
    if (persistent)
        printf("\"conns\":%d,\"ready\":%d,\"ramp\":%d,", cfg.conns, ready, cfg.ramp);
    else
        printf("\"concurrency\":%d,", cfg.concurrency);
    printf("\"size\":%zu,\"seconds\":%.3f,\"wall_s\":%.4f,", cfg.size, cfg.seconds, wall);
    if (persistent)
        printf("\"requests\":%llu,\"rps\":%.1f,", (unsigned long long)done_in_window, rate);
    else
        printf("\"connections\":%llu,\"cps\":%.1f,", (unsigned long long)done_in_window, rate);
    print_dist(persistent ? "lat_us" : "conn_us", &lat, 1000.0);
    printf(",\"reconnects\":%llu,\"connects\":%llu,\"outstanding_at_end\":%d,",
           (unsigned long long)reconnects, (unsigned long long)started_conns, outstanding);
    printf("\"abandoned_connects\":%llu,", (unsigned long long)abandoned);
    printf("\"setup_s\":%.4f,\"drain_s\":%.4f,", (double)(t_rec - t_begin) / NS,
           (double)(t_done - wall_end) / NS);
    print_errors();
    double cpu = cpu1 - cpu0;
    printf(",\"cpu_s\":%.4f,\"cpu_util\":%.4f,", cpu, wall > 0 ? cpu / wall : 0);
    print_affinity();
    printf("}\n");
    fflush(stdout);
    return 0;
}

/* ------------------------------------------------------------------- idle */

static void idle_mark_closed(conn_t *c, int kind, int64_t now) {
    c->closed = 1;
    c->close_kind = (unsigned char)kind;
    c->close_ns = now;
    conn_close(c);
    c->state = ST_CLOSED;
}

static int run_idle(void) {
    nconns = cfg.conns;
    C = calloc((size_t)nconns, sizeof(conn_t));
    for (int i = 0; i < nconns; i++) {
        C[i].id = (uint32_t)i;
        C[i].fd = -1;
        C[i].out = malloc(cfg.size);
        C[i].in = malloc(cfg.size);
        if (!C[i].out || !C[i].in) die("out of memory");
    }
    if (cfg.hold) register_stdin();

    int64_t t_begin = now_ns();
    int64_t serve_deadline = t_begin + (int64_t)(cfg.serve_timeout * NS);
    int64_t hold_deadline = 0, close_deadline = 0;
    int64_t t_stop = 0, t_last_served = 0;
    int launched = 0, inflight = 0, served = 0, failed = 0, late_served = 0;
    int closed_before_stop = 0;
    int phase = 1; /* 1 = serving, 2 = holding, 3 = closing */
    int quit = 0;
    const char *stop_source = "";
    struct epoll_event evs[256];

    for (;;) {
        int64_t now = now_ns();
        /* launch new connections within the ramp limit (phase 1 only) */
        while (phase == 1 && launched < nconns && inflight < cfg.ramp) {
            conn_t *c = &C[launched++];
            if (conn_connect(c, now) < 0) {
                failed++;
                idle_mark_closed(c, CK_ERROR, now);
            } else {
                inflight++;
            }
        }
        if (phase == 1 && (served + failed == nconns || now >= serve_deadline || g_signals)) {
            printf("{\"mode\":\"idle\",\"phase\":\"served\",\"conns\":%d,\"launched\":%d,"
                   "\"served\":%d,\"failed\":%d,\"pending\":%d,\"ramp\":%d,\"size\":%zu,"
                   "\"serve_s\":%.4f,\"elapsed_s\":%.4f,",
                   nconns, launched, served, failed, nconns - served - failed, cfg.ramp, cfg.size,
                   t_last_served ? (double)(t_last_served - t_begin) / NS : 0.0,
                   (double)(now - t_begin) / NS);
            print_errors();
            printf(",");
            print_affinity();
            printf("}\n");
            fflush(stdout);
            if (!cfg.hold) break;
            phase = 2;
            hold_deadline = now + (int64_t)(cfg.hold_max * NS);
        }
        if (phase == 2) {
            int stop = 0;
            if (g_signals) {
                stop = 1;
                stop_source = "signal";
            } else if (now >= hold_deadline) {
                stop = 1;
                stop_source = "hold-max";
            }
            if (stop) {
                t_stop = now;
                phase = 3;
            }
        }
        if (phase == 3) {
            if (!close_deadline) close_deadline = now + (int64_t)(cfg.close_timeout * NS);
            int open = 0;
            for (int i = 0; i < launched; i++)
                if (!C[i].closed) open++;
            if (open == 0 || now >= close_deadline || quit || g_signals > 1) break;
        }
        if (quit) break;

        int n = epoll_wait(epfd, evs, 256, 10);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait failed");
        }
        now = now_ns();
        for (int k = 0; k < n; k++) {
            if (evs[k].data.u32 == STDIN_TAG) {
                int64_t ts = 0;
                int r = read_stdin(&ts);
                if (r == 3) { /* EOF: our controller is gone, stop now */
                    epoll_ctl(epfd, EPOLL_CTL_DEL, 0, NULL);
                    stdin_registered = 0;
                    r = 1;
                    ts = now;
                    if (!*stop_source) stop_source = "stdin-eof";
                }
                if (r == 2) {
                    if (phase < 3) {
                        t_stop = now;
                        stop_source = "quit";
                    }
                    quit = 1;
                    phase = 3;
                } else if (r == 1 && phase < 3) {
                    t_stop = ts;
                    if (!*stop_source) stop_source = "stdin";
                    phase = 3;
                }
                continue;
            }
            conn_t *c = &C[evs[k].data.u32];
            if (c->fd < 0) continue;
            int rc = 0, ck = CK_NONE;
            if (c->state == ST_CONNECTING) {
                rc = conn_finish_connect(c);
                if (rc == 0) rc = conn_send_request(c, now);
                if (rc < 0) ck = CK_ERROR;
            } else if (c->state == ST_SENDING) {
                rc = conn_flush(c);
                if (rc < 0) ck = CK_RESET;
            } else if (c->state == ST_READING) {
                rc = conn_recv(c, &ck);
                if (rc == 1) {
                    inflight--;
                    if (phase == 1) {
                        served++;
                        t_last_served = now;
                    } else {
                        late_served++;
                        c->late_served = 1;
                    }
                    c->served = 1;
                    c->in_len = 0;
                    c->state = ST_HELD;
                    ep_set(c, EPOLLIN | EPOLLRDHUP);
                    continue;
                }
            } else if (c->state == ST_HELD) {
                char buf[512];
                ssize_t r = recv(c->fd, buf, sizeof buf, 0);
                if (r > 0) {
                    errors[E_BADECHO]++; /* unexpected data on an idle connection */
                    continue;
                }
                if (r < 0 && (errno == EAGAIN || errno == EINTR)) continue;
                int kind = r == 0 ? CK_EOF : (errno == ECONNRESET ? CK_RESET : CK_ERROR);
                if (phase < 3) {
                    closed_before_stop++;
                    errors[kind == CK_EOF ? E_EOF : kind == CK_RESET ? E_RESET : E_OTHER]++;
                }
                idle_mark_closed(c, kind, now);
                continue;
            }
            if (rc < 0) {
                if (!c->served) {
                    inflight--;
                    if (phase == 1) failed++;
                }
                idle_mark_closed(c, ck == CK_NONE ? CK_ERROR : ck, now);
            }
        }
    }
    if (!cfg.hold) {
        for (int i = 0; i < nconns; i++) conn_close(&C[i]);
        return 0;
    }
    /* report close times (relative to the stop timestamp) */
    vec_t served_close = {0}, all_close = {0};
    int served_total = 0, served_closed = 0, all_open = 0, all_closed = 0, eof = 0, reset = 0;
    for (int i = 0; i < launched; i++) {
        conn_t *c = &C[i];
        int after_stop = c->closed && c->close_ns >= t_stop;
        if (c->closed && !after_stop) continue; /* failed/closed before the stop */
        if (!c->closed) {
            all_open++;
        } else {
            all_closed++;
            vec_push(&all_close, (uint64_t)(c->close_ns - t_stop));
            if (c->close_kind == CK_EOF) eof++;
            if (c->close_kind == CK_RESET) reset++;
        }
        if (c->served) {
            served_total++;
            if (c->closed) {
                served_closed++;
                vec_push(&served_close, (uint64_t)(c->close_ns - t_stop));
            }
        }
    }
    printf("{\"mode\":\"idle\",\"phase\":\"closed\",\"stop_source\":\"%s\",", stop_source);
    printf("\"served_at_stop\":%d,\"served_closed\":%d,\"served_open\":%d,", served_total,
           served_closed, served_total - served_closed);
    printf("\"open_at_stop\":%d,\"closed\":%d,\"still_open\":%d,\"eof\":%d,\"reset\":%d,",
           all_closed + all_open, all_closed, all_open, eof, reset);
    printf("\"late_served\":%d,\"closed_before_stop\":%d,\"waited_s\":%.4f,", late_served,
           closed_before_stop, (double)(now_ns() - t_stop) / NS);
    print_dist("close_ms_served", &served_close, 1e6);
    printf(",");
    print_dist("close_ms_all", &all_close, 1e6);
    printf(",\"close_times_ms\":[");
    for (size_t i = 0; i < served_close.n; i++)
        printf("%s%.3f", i ? "," : "", (double)served_close.v[i] / 1e6);
    printf("],");
    print_errors();
    printf("}\n");
    fflush(stdout);
    for (int i = 0; i < nconns; i++) conn_close(&C[i]);
    return 0;
}

/* ------------------------------------------------------------------- main */

static void usage(void) {
    fprintf(stderr,
            "usage: loadgen pingpong HOST PORT [--conns N] [--seconds S] [--size B] [--timeout S]\n"
            "                                  [--ramp N] [--connect-timeout S]\n"
            "       loadgen connrate HOST PORT [--concurrency N] [--seconds S] [--size B]\n"
            "       loadgen idle HOST PORT [--conns N] [--ramp N] [--serve-timeout S] [--hold]\n"
            "                              [--close-timeout S] [--hold-max S]\n"
            "HOST must be a loopback IPv4 address (127.0.0.0/8).\n");
    exit(2);
}

static double parse_double(const char *s) {
    char *end;
    double v = strtod(s, &end);
    if (*end || v < 0) usage();
    return v;
}

static int parse_int(const char *s) {
    char *end;
    long v = strtol(s, &end, 10);
    if (*end || v < 0 || v > 10000000) usage();
    return (int)v;
}

int main(int argc, char **argv) {
    if (argc < 4) usage();
    if (strcmp(argv[1], "pingpong") == 0)
        cfg.mode = M_PINGPONG;
    else if (strcmp(argv[1], "connrate") == 0)
        cfg.mode = M_CONNRATE;
    else if (strcmp(argv[1], "idle") == 0)
        cfg.mode = M_IDLE;
    else
        usage();
    cfg.addr.sin_family = AF_INET;
    if (inet_pton(AF_INET, argv[2], &cfg.addr.sin_addr) != 1) usage();
    if ((ntohl(cfg.addr.sin_addr.s_addr) >> 24) != 127) {
        fprintf(stderr, "loadgen: refusing non-loopback host %s\n", argv[2]);
        return 2;
    }
    int port = parse_int(argv[3]);
    if (port < 1 || port > 65535) usage();
    cfg.addr.sin_port = htons((uint16_t)port);
    cfg.conns = cfg.mode == M_IDLE ? 1000 : 32;
    cfg.concurrency = 16;
    cfg.ramp = 0; /* default: 4 for pingpong, 16 for idle */
    cfg.size = 64;
    cfg.seconds = 5;
    cfg.timeout = 5;
    cfg.connect_timeout = 5;
    cfg.serve_timeout = 10;
    cfg.close_timeout = 20;
    cfg.hold_max = 300;
    for (int i = 4; i < argc; i++) {
        const char *a = argv[i];
        int has = i + 1 < argc;
        if (!strcmp(a, "--hold") || !strcmp(a, "--hold-fd-out")) {
            cfg.hold = 1;
            continue;
        }
        if (!has) usage();
        const char *v = argv[++i];
        if (!strcmp(a, "--conns"))
            cfg.conns = parse_int(v);
        else if (!strcmp(a, "--concurrency"))
            cfg.concurrency = parse_int(v);
        else if (!strcmp(a, "--ramp"))
            cfg.ramp = parse_int(v);
        else if (!strcmp(a, "--size"))
            cfg.size = (size_t)parse_int(v);
        else if (!strcmp(a, "--seconds"))
            cfg.seconds = parse_double(v);
        else if (!strcmp(a, "--timeout"))
            cfg.timeout = parse_double(v);
        else if (!strcmp(a, "--connect-timeout"))
            cfg.connect_timeout = parse_double(v);
        else if (!strcmp(a, "--serve-timeout"))
            cfg.serve_timeout = parse_double(v);
        else if (!strcmp(a, "--close-timeout"))
            cfg.close_timeout = parse_double(v);
        else if (!strcmp(a, "--hold-max"))
            cfg.hold_max = parse_double(v);
        else
            usage();
    }
    if (cfg.ramp == 0) cfg.ramp = cfg.mode == M_IDLE ? 16 : 4;
    if (cfg.size < 16 || cfg.size > (1 << 20)) die("--size must be in [16, 1048576]");
    if (cfg.conns < 1 || cfg.concurrency < 1 || cfg.ramp < 1) die("counts must be >= 1");
    if (cfg.seconds > 3600 || cfg.hold_max > 3600 || cfg.serve_timeout > 3600 ||
        cfg.close_timeout > 3600 || cfg.timeout > 3600)
        die("time limits must be <= 3600 s");

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal; /* no SA_RESTART: epoll_wait returns EINTR */
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }

    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0) die("epoll_create1 failed");
    return cfg.mode == M_IDLE ? run_idle() : run_load();
}
