/* A fleet of order-book subscribers in C: bench/loadgen.py's `subscribe`, for scenario 6.

   Scenario 6 judges freshness in a process that reads 1,000 WebSocket clients. In Python
   (picows on uvloop) that process spends about 2.3 us of user time a message besides the
   kernel's reads, and at the ~100,000 messages a second the server sends, it keeps the load
   core busy: it queues what it has not read yet, and the figure measures it as much as the
   server. This fleet does the same in about 0.1 us a message, so that the figure is more
   the server's. It speaks the same protocol to bench/suite.py:

       fleet --port P --clients N --record R --out FILE [--market 396] [--source-ips]
             [--rx-timestamps]

   It connects N clients to ws://127.0.0.1:P/ws (from 127.0.0.2, .3, ... with --source-ips, 900
   an address, as benchlib.source_ip), subscribes each to the market's orderbook, waits for
   every first message (the snapshot) and prints {"ready": ...}. Then it reads stdin: "start"
   (count messages from now and record arrival times), "mark" (the end of a counting
   segment), "stop" (write the results to FILE as loadgen.py does, print {"done": true},
   exit). R clients, evenly spread, log (seq, CLOCK_MONOTONIC ns) for every message; seq is
   read from the message's end ("...,"seq":N}"). Pings are answered. Server frames are
   unmasked (RFC 6455 5.1); this server never fragments a push, so a fragmented message is
   not reassembled (its pieces would be counted, and logged only if one ends in a seq).

   --rx-timestamps: the recorded clients also log, for every message, the kernel's software
   receive stamp of its last segment (SO_TIMESTAMPING, SOF_TIMESTAMPING_RX_SOFTWARE: on
   loopback, when the server's send handed it over), as "rx_logs" beside "logs", moved from
   CLOCK_REALTIME to CLOCK_MONOTONIC. They read one frame at a time, so that a read taking
   two messages does not give the first the second's stamp; but the kernel may merge a
   segment into an unread one before it, which then carries the later stamp, so a stamp is
   never earlier than its message's arrival, sometimes later. It tells the server's delivery
   from the fleet's own delay in coming to a socket among hundreds; 0: no stamp came. */

#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/errqueue.h>
#include <linux/net_tstamp.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define PER_IP 900
#define SAMPLE_MAX (1 << 20)

typedef struct {
    int64_t *seq, *t, *rx;
    size_t n, cap;
} Log;

typedef struct {
    int fd;
    int open;      /* the handshake's 101 was read */
    int first;     /* the snapshot arrived */
    int closed;
    unsigned char *buf;
    size_t len, cap;
    Log *log;
    int64_t rx; /* with --rx-timestamps: when the kernel took the last segment read (monotonic) */
} Client;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static double cpu_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static long sleeps(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_nvcsw;
}

static void die(const char *what) {
    perror(what);
    exit(2);
}

static void write_all(int fd, const void *data, size_t len) {
    const char *p = data;
    int waits = 0;
    while (len) {
        ssize_t k = send(fd, p, len, MSG_NOSIGNAL);
        if (k < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN && waits++ < 1000) { /* small frames into a full socket: rare */
                struct timespec pause = {0, 100000};
                nanosleep(&pause, NULL);
                continue;
            }
            return; /* gone, or not read for 0.1 s: its close or reset is counted on read */
        }
        p += k;
        len -= (size_t)k;
    }
}

/* A client frame (masked, RFC 6455 5.3) of at most 125 bytes of payload. */
static void send_frame(int fd, int opcode, const unsigned char *payload, size_t len) {
    unsigned char frame[6 + 125];
    static const unsigned char mask[4] = {0x12, 0x34, 0x56, 0x78};
    if (len > 125) len = 125;
    frame[0] = (unsigned char)(0x80 | opcode);
    frame[1] = (unsigned char)(0x80 | len);
    memcpy(frame + 2, mask, 4);
    for (size_t i = 0; i < len; i++) frame[6 + i] = payload[i] ^ mask[i % 4];
    write_all(fd, frame, 6 + len);
}

static void log_add(Log *log, int64_t seq, int64_t t, int64_t rx) {
    if (log->n == log->cap) {
        log->cap = log->cap ? log->cap * 2 : 4096;
        log->seq = realloc(log->seq, log->cap * sizeof(int64_t));
        log->t = realloc(log->t, log->cap * sizeof(int64_t));
        log->rx = realloc(log->rx, log->cap * sizeof(int64_t));
        if (!log->seq || !log->t || !log->rx) die("realloc");
    }
    log->seq[log->n] = seq;
    log->t[log->n] = t;
    log->rx[log->n] = rx;
    log->n++;
}

/* seq from the end of a push: ...,"seq":N} */
static int64_t seq_of(const unsigned char *p, size_t len) {
    if (len < 8 || p[len - 1] != '}') return -1;
    size_t i = len - 1;
    while (i > 0 && p[i - 1] >= '0' && p[i - 1] <= '9') i--;
    if (i < 7 || memcmp(p + i - 6, "\"seq\":", 6) != 0) return -1;
    int64_t v = 0;
    for (size_t j = i; j < len - 1; j++) v = v * 10 + (p[j] - '0');
    return v;
}

static struct {
    int counting, recording;
    long messages, bytes, ready, disconnected, errors;
    long close_codes[65536];
    unsigned char sample[SAMPLE_MAX];
    size_t sample_len;
} st;

static const char *subscribe_request;
static int rx_stamps; /* --rx-timestamps */

/* The frame at p, of which avail bytes are here (RFC 6455 5.2): 0 when it is whole, with its
   header's length in *head and its payload's in *n; else how many more bytes would make it
   (or, while its header is short, its header) whole. A masked frame's key is skipped: a server
   must not mask, and it is tolerated, not unmasked. */
static size_t frame_missing(const unsigned char *p, size_t avail, size_t *head, uint64_t *n) {
    if (avail < 2) return 2 - avail;
    uint64_t len = p[1] & 0x7f;
    size_t h = len == 126 ? 4 : len == 127 ? 10 : 2;
    if (p[1] & 0x80) h += 4;
    if (avail < h) return h - avail;
    if (len == 126) len = ((uint64_t)p[2] << 8) | p[3];
    else if (len == 127) {
        len = 0;
        for (int i = 0; i < 8; i++) len = (len << 8) | p[2 + i];
    }
    *head = h;
    *n = len;
    return avail < h + len ? h + len - avail : 0;
}

/* Take the whole frames in the client's buffer. */
static void take(Client *c) {
    size_t at = 0;
    if (!c->open) {
        unsigned char *end = memmem(c->buf, c->len, "\r\n\r\n", 4);
        if (!end) return;
        if (c->len < 12 || memcmp(c->buf, "HTTP/1.1 101", 12) != 0) {
            st.errors++;
            fprintf(stderr, "fleet: handshake refused: %.*s\n", (int)(c->len < 200 ? c->len : 200), c->buf);
            c->closed = 1;
            return;
        }
        c->open = 1;
        at = (size_t)(end - c->buf) + 4;
        send_frame(c->fd, 1, (const unsigned char *)subscribe_request, strlen(subscribe_request));
    }
    for (;;) {
        unsigned char *p = c->buf + at;
        size_t head;
        uint64_t n;
        if (frame_missing(p, c->len - at, &head, &n)) break;
        int opcode = p[0] & 0x0f;
        unsigned char *payload = p + head;
        if (opcode == 1) {
            if (!c->first) {
                c->first = 1;
                if (n >= 18 && memcmp(payload, "{\"message\":\"error\"", 18) == 0) {
                    st.errors++;
                    fprintf(stderr, "%.*s\n", (int)(n < 300 ? n : 300), payload);
                }
                st.ready++;
            } else {
                if (st.counting) {
                    st.messages++;
                    st.bytes += (long)n;
                }
                if (c->log && st.recording) {
                    int64_t seq = seq_of(payload, n);
                    if (seq >= 0) log_add(c->log, seq, now_ns(), c->rx);
                    if (n <= SAMPLE_MAX) {
                        memcpy(st.sample, payload, n);
                        st.sample_len = n;
                    }
                }
            }
        } else if (opcode == 9) {
            send_frame(c->fd, 10, payload, n);
        } else if (opcode == 8) {
            int code = n >= 2 ? (payload[0] << 8) | payload[1] : 1005;
            st.close_codes[code]++;
            c->closed = 1;
        }
        at += head + n;
    }
    if (at) {
        memmove(c->buf, c->buf + at, c->len - at);
        c->len -= at;
    }
}

/* read(), and the kernel's software receive timestamp of the last segment it returned
   (SO_TIMESTAMPING, SOF_TIMESTAMPING_RX_SOFTWARE: set when the segment reached the socket's
   host, here when the server's send handed it to loopback). It is CLOCK_REALTIME; the
   driver's post times are CLOCK_MONOTONIC, so it is moved by the clocks' offset read now. */
static ssize_t read_stamped(Client *c, size_t room) {
    struct iovec iov = {.iov_base = c->buf + c->len, .iov_len = room};
    union {
        char buf[CMSG_SPACE(sizeof(struct scm_timestamping))];
        struct cmsghdr align;
    } control;
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf,
                         .msg_controllen = sizeof control.buf};
    c->rx = 0; /* 0 in the log: the kernel gave no stamp (the suite then reports none) */
    ssize_t k = recvmsg(c->fd, &msg, 0);
    if (k <= 0) return k;
    for (struct cmsghdr *cm = CMSG_FIRSTHDR(&msg); cm; cm = CMSG_NXTHDR(&msg, cm)) {
        if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_TIMESTAMPING) continue;
        struct scm_timestamping stamps;
        memcpy(&stamps, CMSG_DATA(cm), sizeof stamps);
        struct timespec real, mono;
        clock_gettime(CLOCK_REALTIME, &real);
        clock_gettime(CLOCK_MONOTONIC, &mono);
        int64_t offset = ((int64_t)real.tv_sec - mono.tv_sec) * 1000000000 + real.tv_nsec - mono.tv_nsec;
        int64_t at = (int64_t)stamps.ts[0].tv_sec * 1000000000 + stamps.ts[0].tv_nsec;
        if (at) c->rx = at - offset;
    }
    return k;
}

/* Room for at least ``room`` more bytes in the client's buffer. */
static void reserve(Client *c, size_t room) {
    if (c->cap - c->len >= room) return;
    c->cap = c->len + room + 65536;
    c->buf = realloc(c->buf, c->cap);
    if (!c->buf) die("realloc");
}

static int read_client(Client *c) {
    for (;;) {
        reserve(c, 65536);
        size_t want = 65536;
        /* A recorded client with --rx-timestamps reads up to the end of one frame at a time,
           so that each message's stamp is its own segment's, not a later one's that the same
           read also took (the fleet may come to a socket after two pushes). */
        int exact = rx_stamps && c->log && c->open;
        if (exact) {
            size_t head = 0;
            uint64_t n;
            /* take() leaves the buffer at a frame's start, holding no whole frame: never 0 */
            want = frame_missing(c->buf, c->len, &head, &n);
            if (!head) {
                /* The header is not all here. A peek at what is (at most a header's length)
                   tells the frame's end, so that one read takes it: not one read for the
                   header's first bytes, another for its length and a third for the payload. */
                ssize_t seen = recv(c->fd, c->buf + c->len, 14, MSG_PEEK | MSG_DONTWAIT);
                if (seen > 0) want = (size_t)seen + frame_missing(c->buf, c->len + (size_t)seen, &head, &n);
            }
            reserve(c, want);
        }
        size_t room = exact ? want : c->cap - c->len;
        ssize_t k = rx_stamps && c->log ? read_stamped(c, room) : read(c->fd, c->buf + c->len, room);
        if (k > 0) {
            c->len += (size_t)k;
            take(c);
            if (c->closed) return -1;
            if ((size_t)k < want) return 0; /* drained, most likely: epoll says if not */
            continue;
        }
        if (k == 0) return -1;
        if (errno == EAGAIN || errno == EINTR) return 0;
        return -1;
    }
}

static int connect_one(int port, const char *source) {
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, "127.0.0.1", &to.sin_addr);
    int fd;
    for (int attempt = 0;; attempt++) { /* as loadgen.py: five tries, then a failure */
        fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0) die("socket");
        if (source) {
            struct sockaddr_in local = {.sin_family = AF_INET};
            inet_pton(AF_INET, source, &local.sin_addr);
            if (bind(fd, (struct sockaddr *)&local, sizeof local) < 0) die("bind");
        }
        if (connect(fd, (struct sockaddr *)&to, sizeof to) == 0) break;
        close(fd);
        if (attempt == 4) {
            perror("fleet: connect");
            return -1;
        }
        struct timespec pause = {0, 200000000L * (attempt + 1)};
        nanosleep(&pause, NULL);
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    char request[512];
    int len = snprintf(request, sizeof request,
                       "GET /ws HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\n"
                       "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                       "Sec-WebSocket-Version: 13\r\n\r\n",
                       port);
    write_all(fd, request, (size_t)len);
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    return fd;
}

static void json_string(FILE *f, const unsigned char *s, size_t n) {
    fputc('"', f);
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = s[i];
        if (ch == '"' || ch == '\\') fprintf(f, "\\%c", ch);
        else if (ch < 0x20) fprintf(f, "\\u%04x", ch);
        else fputc(ch, f);
    }
    fputc('"', f);
}

/* The recorded clients' logs as JSON, {"client": [[seq, t], ...], ...}: t their read times,
   or with ``rx`` their kernel receive stamps. */
static void write_logs(FILE *f, const char *name, const Client *cs, int clients, int rx) {
    fprintf(f, ", \"%s\": {", name);
    int comma = 0;
    for (int i = 0; i < clients; i++) {
        const Log *log = cs[i].log;
        if (!log) continue;
        fprintf(f, "%s\"%d\": [", comma ? ", " : "", i);
        for (size_t j = 0; j < log->n; j++)
            fprintf(f, "%s[%lld, %lld]", j ? ", " : "", (long long)log->seq[j],
                    (long long)(rx ? log->rx : log->t)[j]);
        fprintf(f, "]");
        comma = 1;
    }
    fprintf(f, "}");
}

int main(int argc, char **argv) {
    int port = 0, clients = 0, record = 0, source_ips = 0;
    const char *out = NULL, *market = "396";
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--source-ips")) { source_ips = 1; continue; }
        if (!strcmp(a, "--rx-timestamps")) { rx_stamps = 1; continue; }
        if (!v) { fprintf(stderr, "fleet: %s needs a value\n", a); return 2; }
        if (!strcmp(a, "--port")) port = atoi(v);
        else if (!strcmp(a, "--clients")) clients = atoi(v);
        else if (!strcmp(a, "--record")) record = atoi(v);
        else if (!strcmp(a, "--out")) out = v;
        else if (!strcmp(a, "--market")) market = v;
        else { fprintf(stderr, "fleet: unknown argument %s\n", a); return 2; }
        i++;
    }
    if (!port || clients <= 0 || !out) {
        fprintf(stderr, "usage: fleet --port P --clients N --record R --out FILE [--market M] [--source-ips] "
                        "[--rx-timestamps]\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN); /* a write to a connection the server closed fails, not kills */
    struct rlimit nofile;
    getrlimit(RLIMIT_NOFILE, &nofile);
    nofile.rlim_cur = nofile.rlim_max;
    setrlimit(RLIMIT_NOFILE, &nofile);
    static char request[128];
    snprintf(request, sizeof request, "{\"topic\":\"orderbook\",\"market_id\":\"%s\"}", market);
    subscribe_request = request;

    int every = record > 0 ? (clients / record > 0 ? clients / record : 1) : 0;
    Client *cs = calloc((size_t)clients, sizeof(Client));
    int ep = epoll_create1(0);
    if (!cs || ep < 0) die("setup");
    int64_t started = now_ns();
    int logs = 0, failures = 0;
    for (int i = 0; i < clients; i++) {
        char source[32];
        snprintf(source, sizeof source, "127.0.0.%d", 2 + i / PER_IP);
        cs[i].fd = connect_one(port, source_ips ? source : NULL);
        if (cs[i].fd < 0) {
            failures++;
            continue;
        }
        if (every && i % every == 0 && logs < record) {
            cs[i].log = calloc(1, sizeof(Log));
            logs++;
            int stamping = SOF_TIMESTAMPING_RX_SOFTWARE | SOF_TIMESTAMPING_SOFTWARE;
            if (rx_stamps && setsockopt(cs[i].fd, SOL_SOCKET, SO_TIMESTAMPING, &stamping, sizeof stamping) < 0)
                die("SO_TIMESTAMPING");
        }
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, cs[i].fd, &ev) < 0) die("epoll_ctl");
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = UINT32_MAX};
    epoll_ctl(ep, EPOLL_CTL_ADD, 0, &ev);

    char line[256];
    size_t line_len = 0;
    int said_ready = 0, stopping = 0;
    double cpu_start = 0, cpu_mark = 0;
    int64_t t_start = 0, t_mark = 0, t_stop = 0;
    long sleeps_start = 0, messages_at_mark = 0, bytes_at_mark = 0;
    static char marks[1 << 16];
    size_t marks_len = 0;
    struct epoll_event events[256];
    while (!stopping) {
        if (!said_ready && (st.ready >= clients - failures || now_ns() - started > 120000000000LL)) {
            said_ready = 1;
            printf("{\"ready\": %ld, \"clients\": %d, \"failures\": %d, \"failure\": [], "
                   "\"connect_s\": %.2f, \"errors\": %ld}\n",
                   st.ready, clients, failures, (now_ns() - started) / 1e9, st.errors);
            fflush(stdout);
        }
        int n = epoll_wait(ep, events, 256, said_ready ? -1 : 100);
        for (int k = 0; k < n; k++) {
            uint32_t i = events[k].data.u32;
            if (i == UINT32_MAX) {
                if (line_len == sizeof line - 1) line_len = 0; /* no command is this long */
                ssize_t got = read(0, line + line_len, sizeof line - 1 - line_len);
                if (got <= 0) { stopping = 1; t_stop = now_ns(); break; }
                line_len += (size_t)got;
                char *nl;
                while (!stopping && (nl = memchr(line, '\n', line_len))) {
                    size_t used = (size_t)(nl - line) + 1;
                    while (nl > line && (nl[-1] == ' ' || nl[-1] == '\r' || nl[-1] == '\t')) nl--;
                    *nl = 0; /* a command without its trailing white space, as loadgen strips */
                    if (!strcmp(line, "start")) {
                        st.messages = st.bytes = 0;
                        st.counting = st.recording = 1;
                        t_start = now_ns();
                        cpu_start = cpu_s();
                        sleeps_start = sleeps();
                    } else if (!strcmp(line, "mark")) {
                        t_mark = now_ns();
                        cpu_mark = cpu_s();
                        messages_at_mark = st.messages;
                        bytes_at_mark = st.bytes;
                        int wrote = snprintf(marks + marks_len, sizeof marks - marks_len,
                                             "%s[%lld, %ld, %.6f, %ld]", marks_len ? ", " : "",
                                             (long long)t_mark, st.messages, cpu_mark, sleeps());
                        if (wrote > 0 && (size_t)wrote < sizeof marks - marks_len)
                            marks_len += (size_t)wrote;
                        else marks[marks_len] = 0; /* full: later marks are left out */
                    } else if (!strcmp(line, "stop")) {
                        st.recording = 0;
                        t_stop = now_ns();
                        stopping = 1;
                    }
                    memmove(line, line + used, line_len - used);
                    line_len -= used;
                }
                if (stopping) break; /* nothing after stop counts, as loadgen.py */
                continue;
            }
            Client *c = &cs[i];
            if (c->fd < 0) continue;
            if (read_client(c) < 0) {
                epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                close(c->fd);
                c->fd = -1;
                st.disconnected++;
            }
        }
    }
    FILE *f = fopen(out, "w");
    if (!f) die(out);
    fprintf(f, "{\"t_start\": %lld, \"cpu_start\": %.6f, \"sleeps_start\": %ld, ", (long long)t_start,
            cpu_start, sleeps_start);
    fprintf(f, "\"t_mark\": %lld, \"cpu_mark\": %.6f, \"messages_at_mark\": %ld, \"bytes_at_mark\": %ld, ",
            (long long)t_mark, cpu_mark, messages_at_mark, bytes_at_mark);
    fprintf(f, "\"marks\": [%s], \"t_stop\": %lld, \"messages_total\": %ld, ", marks, (long long)t_stop,
            st.messages);
    int connected = 0;
    for (int i = 0; i < clients; i++) connected += cs[i].open; /* the handshake completed */
    fprintf(f, "\"clients\": %d, \"connected\": %d, \"ready\": %ld, \"disconnected\": %ld, ", clients,
            connected, st.ready, st.disconnected);
    fprintf(f, "\"close_codes\": {");
    int comma = 0;
    for (int code = 0; code < 65536; code++)
        if (st.close_codes[code]) {
            fprintf(f, "%s\"%d\": %ld", comma ? ", " : "", code, st.close_codes[code]);
            comma = 1;
        }
    fprintf(f, "}, \"errors\": %ld, \"failures\": %d, \"sample\": ", st.errors, failures);
    json_string(f, st.sample, st.sample_len);
    write_logs(f, "logs", cs, clients, 0);
    if (rx_stamps) write_logs(f, "rx_logs", cs, clients, 1); /* the same, at the socket */
    fprintf(f, "}\n");
    fclose(f);
    for (int i = 0; i < clients; i++)
        if (cs[i].fd >= 0) close(cs[i].fd);
    printf("{\"done\": true}\n");
    fflush(stdout);
    return 0;
}
