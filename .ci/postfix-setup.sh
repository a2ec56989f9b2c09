#!/usr/bin/env bash
# Install (if missing), configure and (re)start a loopback-only Postfix for
# sourceauth's end-to-end tests.  Idempotent: safe to run any number of times.
#
#   sudo bash .ci/postfix-setup.sh
#
# Topology (all on 127.0.0.1; see docs/postfix.md):
#   10025  public smtpd, content_filter = scan:[127.0.0.1]:10030 (the filter)
#   10030  sourceauth (NOT started here)
#   10031  reinjection smtpd, no content_filter (released mail, challenges)
#   10027  submission stand-in: content_filter = scan:[127.0.0.1]:10033 (sourceauth's
#          [correspondents] listen, NOT started here); trusts loopback where a real
#          submission service trusts SASL (docs/postfix.md, "Correspondents")
#   10026  milter-mode smtpd: smtpd_milters = inet:127.0.0.1:10032 (sourceauth's
#          [milter] listen, NOT started here), no content_filter
#   10028  the same with smtpd_milters = unix:/run/sourceauth-milter.sock
#   10040  smtp-sink refusing every RCPT with 550 5.1.1 (domain remote.test)
#   10041  test-owned capture server (domain ok.test; NOT started here)
#   example.test: virtual Maildirs under /var/mail/vhosts (uid/gid 5000)
# Port 25 stays closed.  No systemd: Postfix runs with chroot off.
set -Eeuo pipefail

TAG="[postfix-setup]"
say()  { printf '%s %s\n' "$TAG" "$*"; }
die()  { printf '%s ERROR: %s\n' "$TAG" "$*" >&2; exit 1; }
trap 'rc=$?; printf "%s ERROR: command failed (exit %s) at line %s: %s\n" "$TAG" "$rc" "$LINENO" "$BASH_COMMAND" >&2' ERR

START_TS=$(date +%s.%N)

[ "$(id -u)" -eq 0 ] || die "must run as root (try: sudo bash $0)"

DOMAIN="example.test"
MYHOSTNAME="mx.example.test"
VMAIL_ID=5000
VHOSTS=/var/mail/vhosts
MAILBOXES=(alice bob carol confirm bounces)
FILTER_NEXTHOP="scan:[127.0.0.1]:10030"
SINK_PORT=10040
SINK_PIDFILE=/run/sourceauth-smtp-sink.pid
SINK_LOG=/var/log/smtp-sink.log
MAILLOG=/var/log/postfix.log
MILTER_SMTPD_PORT=10026
MILTER_SPEC="inet:127.0.0.1:10032"
MILTER_UNIX_SMTPD_PORT=10028
MILTER_UNIX_SPEC="unix:/run/sourceauth-milter.sock"

# ---------------------------------------------------------------- helpers
port_open() {  # port_open PORT -> 0 when something accepts on 127.0.0.1:PORT
    timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}
listening_on_25() {  # any TCP listener on port 25, any address
    if command -v ss >/dev/null 2>&1; then
        ss -Hltn 2>/dev/null | awk '{print $4}' | grep -Eq '(^|[:.\]])25$'
    else
        port_open 25
    fi
}
pg_listening() { port_open 5432; }

# ------------------------------------------------------ 0. state before
PG_BEFORE=no
if pg_listening; then PG_BEFORE=yes; fi
say "PostgreSQL on 127.0.0.1:5432 before: $PG_BEFORE"

# ------------------------------------------------------------ 1. install
export DEBIAN_FRONTEND=noninteractive
need_install=no
for bin in /usr/sbin/postfix /usr/sbin/postconf /usr/sbin/smtp-sink /usr/sbin/postqueue; do
    [ -x "$bin" ] || need_install=yes
done
if [ "$need_install" = yes ]; then
    say "installing postfix (+swaks) from Debian packages, without prompts"
    command -v apt-get >/dev/null || die "apt-get not found: this script supports Debian/Ubuntu only"
    printf '%s\n' \
        "postfix postfix/main_mailer_type select No configuration" \
        "postfix postfix/mailname string $DOMAIN" | debconf-set-selections
    # Never let package scripts start/restart services (PostgreSQL etc.):
    # a policy-rc.d that forbids it, only for the duration of the install.
    OWN_POLICY=no
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        OWN_POLICY=yes
    fi
    cleanup_policy() { if [ "${OWN_POLICY:-no}" = yes ]; then rm -f /usr/sbin/policy-rc.d; fi; }
    trap cleanup_policy EXIT
    say "apt-get update"
    apt-get update -qq || die "apt-get update failed"
    # --no-remove: abort rather than remove any installed package.
    say "apt-get install -y --no-install-recommends --no-remove postfix swaks"
    apt-get install -y -qq --no-install-recommends --no-remove \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        postfix swaks >/tmp/postfix-setup-apt.log 2>&1 \
        || { tail -n 30 /tmp/postfix-setup-apt.log >&2; die "apt-get install postfix failed (log: /tmp/postfix-setup-apt.log)"; }
    cleanup_policy; OWN_POLICY=no
    say "installed: $(dpkg-query -W -f='${Package} ${Version}' postfix)"
else
    say "postfix already installed: $(dpkg-query -W -f='${Package} ${Version}' postfix 2>/dev/null || postconf -h mail_version)"
fi

# ------------------------------------------------------ 2. base files
if [ ! -s /etc/postfix/main.cf ]; then
    say "creating /etc/postfix/main.cf from /usr/share/postfix/main.cf.debian"
    cp /usr/share/postfix/main.cf.debian /etc/postfix/main.cf
fi
[ -s /etc/mailname ] || { say "writing /etc/mailname"; echo "$DOMAIN" > /etc/mailname; }
if [ ! -e /etc/aliases ]; then
    say "creating /etc/aliases"
    printf 'postmaster: root\n' > /etc/aliases
fi

# vmail user/group (uid/gid 5000)
if ! getent group vmail >/dev/null; then
    getent group "$VMAIL_ID" >/dev/null && die "gid $VMAIL_ID is taken by group $(getent group $VMAIL_ID | cut -d: -f1)"
    say "creating group vmail ($VMAIL_ID)"; groupadd -g "$VMAIL_ID" vmail
fi
if ! getent passwd vmail >/dev/null; then
    getent passwd "$VMAIL_ID" >/dev/null && die "uid $VMAIL_ID is taken by user $(getent passwd $VMAIL_ID | cut -d: -f1)"
    say "creating user vmail ($VMAIL_ID)"
    useradd -u "$VMAIL_ID" -g vmail -d "$VHOSTS" -M -s /usr/sbin/nologin vmail
fi
[ "$(id -u vmail)" = "$VMAIL_ID" ] || die "user vmail exists with uid $(id -u vmail), expected $VMAIL_ID"
[ "$(getent group vmail | cut -d: -f3)" = "$VMAIL_ID" ] || die "group vmail exists with another gid, expected $VMAIL_ID"

say "Maildirs under $VHOSTS/$DOMAIN: ${MAILBOXES[*]}"
install -d -o vmail -g vmail -m 0755 "$VHOSTS"
install -d -o vmail -g vmail -m 0700 "$VHOSTS/$DOMAIN"
for m in "${MAILBOXES[@]}"; do
    for sub in "" /new /cur /tmp; do
        install -d -o vmail -g vmail -m 0700 "$VHOSTS/$DOMAIN/$m$sub"
    done
done

say "writing /etc/postfix/vmailbox and /etc/postfix/transport (texthash: no postmap)"
{
    echo "# managed by .ci/postfix-setup.sh"
    for m in "${MAILBOXES[@]}"; do echo "$m@$DOMAIN $DOMAIN/$m/"; done
} > /etc/postfix/vmailbox
cat > /etc/postfix/transport <<EOF
# managed by .ci/postfix-setup.sh
# Postfix's own DSNs for challenges (MAIL FROM:<bounces+TOKEN@$DOMAIN>) do not
# pass through content_filter: route the bounce address to the filter.
bounces@$DOMAIN $FILTER_NEXTHOP
# simulated remote world
remote.test smtp:[127.0.0.1]:$SINK_PORT
ok.test smtp:[127.0.0.1]:10041
fail.test error:5.1.1 simulated permanent failure
EOF

# ------------------------------------------------------------ 3. main.cf
say "postconf -e: main.cf settings"
# local_header_rewrite_clients empty: test clients on loopback are treated like
# Internet clients (as on a real MX), so Postfix adds no missing Message-ID,
# Date or From and does not qualify bare addresses: the filter sees the
# message as sent.  Fast queue timers: deferred mail retries every ~1 s.
postconf -e \
    "compatibility_level = 3.6" \
    "myhostname = $MYHOSTNAME" \
    "mydomain = $DOMAIN" \
    "myorigin = /etc/mailname" \
    "inet_interfaces = loopback-only" \
    "inet_protocols = ipv4" \
    "mynetworks = 127.0.0.0/8" \
    "mydestination = localhost" \
    "relay_domains = remote.test ok.test fail.test" \
    "default_transport = error:5.7.1 no outbound relaying in test" \
    "transport_maps = texthash:/etc/postfix/transport" \
    "virtual_mailbox_domains = $DOMAIN" \
    "virtual_mailbox_base = $VHOSTS" \
    "virtual_mailbox_maps = texthash:/etc/postfix/vmailbox" \
    "virtual_uid_maps = static:$VMAIL_ID" \
    "virtual_gid_maps = static:$VMAIL_ID" \
    "virtual_minimum_uid = 100" \
    "recipient_delimiter = +" \
    "alias_maps = hash:/etc/aliases" \
    "alias_database = hash:/etc/aliases" \
    "content_filter = $FILTER_NEXTHOP" \
    "smtpd_forbid_bare_newline = normalize" \
    "smtpd_forbid_bare_newline_exclusions =" \
    "local_header_rewrite_clients =" \
    "smtpd_tls_security_level = none" \
    "smtp_tls_security_level = none" \
    "smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination" \
    "maillog_file = $MAILLOG" \
    "queue_run_delay = 1s" \
    "minimal_backoff_time = 1s" \
    "maximal_backoff_time = 2s" \
    "message_size_limit = 52428800" \
    "virtual_mailbox_limit = 0" \
    "biff = no"
# TLS is off: drop Debian's snakeoil paths (ssl-cert may not be installed).
postconf -X smtpd_tls_cert_file smtpd_tls_key_file 2>/dev/null || true
newaliases

# ---------------------------------------------------------- 4. master.cf
say "master.cf: port 25 off, 10025 public, 10026/10028 public via milter (TCP/UNIX), 10031 reinjection, scan transport, chroot off"
if postconf -M smtp/inet 2>/dev/null | grep -q .; then
    postconf -M# smtp/inet
fi
postconf -M "127.0.0.1:10025/inet=127.0.0.1:10025 inet n - n - - smtpd"
postconf -P "127.0.0.1:10025/inet/syslog_name=postfix/public"

postconf -M "scan/unix=scan unix - - n - 10 smtp"
postconf -P "scan/unix/smtp_send_xforward_command=yes" \
            "scan/unix/disable_mime_output_conversion=yes" \
            "scan/unix/syslog_name=postfix/scan"

postconf -M "127.0.0.1:10031/inet=127.0.0.1:10031 inet n - n - 10 smtpd"
postconf -P "127.0.0.1:10031/inet/syslog_name=postfix/reinject" \
            "127.0.0.1:10031/inet/content_filter=" \
            "127.0.0.1:10031/inet/receive_override_options=no_unknown_recipient_checks,no_header_body_checks,no_milters" \
            "127.0.0.1:10031/inet/smtpd_recipient_restrictions=permit_mynetworks,reject" \
            "127.0.0.1:10031/inet/smtpd_relay_restrictions=permit_mynetworks,reject" \
            "127.0.0.1:10031/inet/mynetworks=127.0.0.0/8" \
            "127.0.0.1:10031/inet/smtpd_authorized_xforward_hosts=127.0.0.0/8"

# Milter mode (docs/postfix.md): a second public smtpd whose mail goes through sourceauth's
# milter before it is queued, and is then delivered by Postfix itself (no content_filter).
# milter_default_action=tempfail: a filter that is down or fails answers 4xx, never accepts.
postconf -M "127.0.0.1:$MILTER_SMTPD_PORT/inet=127.0.0.1:$MILTER_SMTPD_PORT inet n - n - - smtpd"
postconf -P "127.0.0.1:$MILTER_SMTPD_PORT/inet/syslog_name=postfix/milter" \
            "127.0.0.1:$MILTER_SMTPD_PORT/inet/content_filter=" \
            "127.0.0.1:$MILTER_SMTPD_PORT/inet/smtpd_milters=$MILTER_SPEC" \
            "127.0.0.1:$MILTER_SMTPD_PORT/inet/milter_default_action=tempfail" \
            "127.0.0.1:$MILTER_SMTPD_PORT/inet/milter_protocol=6"
# The same over a UNIX socket (no TCP delayed-ACK stall between Postfix's small writes).
postconf -M "127.0.0.1:$MILTER_UNIX_SMTPD_PORT/inet=127.0.0.1:$MILTER_UNIX_SMTPD_PORT inet n - n - - smtpd"
postconf -P "127.0.0.1:$MILTER_UNIX_SMTPD_PORT/inet/syslog_name=postfix/milter-unix" \
            "127.0.0.1:$MILTER_UNIX_SMTPD_PORT/inet/content_filter=" \
            "127.0.0.1:$MILTER_UNIX_SMTPD_PORT/inet/smtpd_milters=$MILTER_UNIX_SPEC" \
            "127.0.0.1:$MILTER_UNIX_SMTPD_PORT/inet/milter_default_action=tempfail" \
            "127.0.0.1:$MILTER_UNIX_SMTPD_PORT/inet/milter_protocol=6"

# postlogd is needed for maillog_file (present in Debian's master.cf; ensure it)
if ! postconf -M postlog/unix-dgram 2>/dev/null | grep -q .; then
    postconf -M "postlog/unix-dgram=postlog unix-dgram n - n - 1 postlogd"
fi
postconf -F '*/*/chroot=n'

# Correspondents (docs/postfix.md): mail users send out goes to sourceauth's second listener
# instead of the inbound filter. A real site puts this content_filter on its SASL submission
# service; the tests have no SASL server, so loopback (mynetworks) stands in for the login.
SUBMIT_PORT=10027
postconf -M "127.0.0.1:$SUBMIT_PORT/inet=127.0.0.1:$SUBMIT_PORT inet n - n - - smtpd"
postconf -P "127.0.0.1:$SUBMIT_PORT/inet/syslog_name=postfix/submission" \
            "127.0.0.1:$SUBMIT_PORT/inet/content_filter=scan:[127.0.0.1]:10033" \
            "127.0.0.1:$SUBMIT_PORT/inet/smtpd_recipient_restrictions=permit_mynetworks,reject" \
            "127.0.0.1:$SUBMIT_PORT/inet/smtpd_relay_restrictions=permit_mynetworks,reject"

touch "$MAILLOG"
say "postfix check"
postfix check || die "postfix check failed (see messages above)"

# ----------------------------------------------------------- 5. (re)start
if postfix status >/dev/null 2>&1; then
    say "postfix is running: stopping it to apply the configuration"
    postfix stop >/dev/null 2>&1 || true
    for _ in $(seq 1 100); do
        postfix status >/dev/null 2>&1 || break
        sleep 0.1
    done
    postfix status >/dev/null 2>&1 && die "postfix did not stop within 10 s"
fi
say "postfix start"
postfix start >/dev/null 2>&1 || { tail -n 20 "$MAILLOG" >&2; die "postfix start failed"; }

for p in 10025 "$MILTER_SMTPD_PORT" "$MILTER_UNIX_SMTPD_PORT" 10031 "$SUBMIT_PORT"; do
    ok=no
    for _ in $(seq 1 100); do
        if port_open "$p"; then ok=yes; break; fi
        sleep 0.1
    done
    [ "$ok" = yes ] || { tail -n 20 "$MAILLOG" >&2; die "postfix does not accept on 127.0.0.1:$p"; }
    say "127.0.0.1:$p accepts connections"
done

# ------------------------------------------------------------ 6. smtp-sink
sink_running() {
    [ -s "$SINK_PIDFILE" ] || return 1
    local pid; pid=$(cat "$SINK_PIDFILE")
    [ -r "/proc/$pid/cmdline" ] || return 1
    tr '\0' ' ' < "/proc/$pid/cmdline" | grep -q "smtp-sink.*127.0.0.1:$SINK_PORT" || return 1
    port_open "$SINK_PORT"
}
if sink_running; then
    say "smtp-sink already running on 127.0.0.1:$SINK_PORT (pid $(cat "$SINK_PIDFILE"))"
else
    port_open "$SINK_PORT" && die "127.0.0.1:$SINK_PORT is taken by something that is not our smtp-sink"
    say "starting smtp-sink on 127.0.0.1:$SINK_PORT (every RCPT -> 550 5.1.1)"
    # -f RCPT: hard-reject every RCPT with the -B reply.  setsid+nohup: survives us.
    setsid nohup /usr/sbin/smtp-sink -u nobody -f RCPT \
        -B "550 5.1.1 Recipient address rejected: User unknown" \
        "127.0.0.1:$SINK_PORT" 100 </dev/null >>"$SINK_LOG" 2>&1 &
    echo $! > "$SINK_PIDFILE"
    ok=no
    for _ in $(seq 1 50); do
        if port_open "$SINK_PORT"; then ok=yes; break; fi
        sleep 0.1
    done
    [ "$ok" = yes ] || { tail -n 5 "$SINK_LOG" >&2; die "smtp-sink did not start"; }
    say "smtp-sink started (pid $(cat "$SINK_PIDFILE"))"
fi

# ------------------------------------------------------------- 7. checks
got=$(postconf -h content_filter)
[ "$got" = "$FILTER_NEXTHOP" ] || die "content_filter is '$got', expected '$FILTER_NEXTHOP'"
banner=$(timeout 5 bash -c 'exec 3<>/dev/tcp/127.0.0.1/10025; head -n1 <&3; printf "QUIT\r\n" >&3' 2>/dev/null || true)
case "$banner" in
    220*) say "10025 banner: ${banner%$'\r'}" ;;
    *) die "127.0.0.1:10025 did not greet with 220 (got: '$banner')" ;;
esac
if listening_on_25; then
    die "something listens on port 25 (ss -ltnp | grep ':25 ')"
fi
say "port 25: closed"

if [ "$PG_BEFORE" = yes ]; then
    pg_listening || die "PostgreSQL was listening on 5432 before and is not now"
    say "PostgreSQL on 127.0.0.1:5432: still listening"
fi

END_TS=$(date +%s.%N)
say "done in $(awk -v a="$START_TS" -v b="$END_TS" 'BEGIN{printf "%.1f", b-a}') s: Postfix $(postconf -h mail_version) ready (log: $MAILLOG)"
