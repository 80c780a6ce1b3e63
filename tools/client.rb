#!/usr/bin/env ruby
# frozen_string_literal: true

# Load-test and acceptance client for the ipevents server.
#
# It resets the server, sends a random stream of protobuf-encoded IpEvent
# messages (one per UDP datagram, or one per POST /events with --rest), then
# asks the HTTP API what it saw for one app and checks the answer: the 14 hosts
# of the app's /28 must come back as good_ips and every other IP sent for the
# app as bad_ips.
#
# Needs only Debian's `ruby` and `ruby-google-protobuf` packages.
#
#   ruby tools/client.rb --host 127.0.0.1 --tcp 3000 --udp 3001
#   ruby tools/client.rb --rate 33000 --events 10000000   # the five-minute run
#   ruby tools/client.rb --rest --events 2000              # over HTTP instead
#   ruby tools/client.rb --seed 42 --strict                # reproducible, exact count
#   ruby tools/client.rb --help
#
# Exit status: 0 when the check passes, 1 when it fails, 2 on a usage or
# connection error.

require "json"
require "net/http"
require "optparse"
require "set"
require "socket"

require_relative "ip_event_pb"

# Turns command-line arguments into a frozen options hash, with defaults.
module Options
  DEFAULTS = {
    host: "127.0.0.1",
    tcp: 3000,
    udp: 3001,
    events: nil,
    # The reference client sleeps 10 microseconds between sends, which is a
    # nominal 100,000 events per second.
    rate: 100_000.0,
    settle: 0.2,
    seed: nil,
    strict: false,
    progress: 5.0
  }.freeze

  def self.parse(argv)
    opts = DEFAULTS.dup
    parser = build_parser(opts)
    parser.parse!(argv)
    raise OptionParser::InvalidArgument, "unexpected arguments: #{argv.join(' ')}" unless argv.empty?

    validate(opts)
    opts.freeze
  rescue OptionParser::ParseError => e
    warn "client.rb: #{e.message}"
    warn parser.banner if parser
    exit 2
  end

  def self.build_parser(opts)
    OptionParser.new do |o|
      o.banner = "Usage: ruby tools/client.rb [--host HOST] [--tcp PORT] [--udp PORT|--rest] [options]"
      o.separator ""
      o.on("--host HOST", String, "Server address (default #{DEFAULTS[:host]})") { |v| opts[:host] = v }
      o.on("--tcp PORT", Integer, "HTTP port (default #{DEFAULTS[:tcp]})") { |v| opts[:tcp] = v }
      o.on("--udp PORT", Integer, "UDP port; 0 sends over HTTP like --rest (default #{DEFAULTS[:udp]})") do |v|
        opts[:udp] = v
      end
      o.on("--rest", "Send each event as POST /events on one keep-alive connection") { opts[:udp] = 0 }
      o.on("--events N", Integer, "Events to send (default: random, 1 to 9999)") { |v| opts[:events] = v }
      o.on("--rate R", Float, "Events per second; 0 means as fast as possible (default 100000)") do |v|
        opts[:rate] = v
      end
      o.on("--settle SECONDS", Float, "Wait after sending before asking (default #{DEFAULTS[:settle]})") do |v|
        opts[:settle] = v
      end
      o.on("--seed N", Integer, "Seed for every random choice, for a reproducible run") { |v| opts[:seed] = v }
      o.on("--strict", "Also fail when the server's count differs from the events sent",
           "(always on with --rest, where every event is acknowledged)") { opts[:strict] = true }
      o.on("--progress SECONDS", Float, "Interval between progress lines (default #{DEFAULTS[:progress]})") do |v|
        opts[:progress] = v
      end
      o.on("-h", "--help", "Show this help") do
        puts o
        exit 0
      end
    end
  end

  def self.validate(opts)
    check(opts[:tcp].between?(1, 65_535), "--tcp must be a port from 1 to 65535")
    check(opts[:udp].between?(0, 65_535), "--udp must be a port from 1 to 65535, or 0 for --rest")
    check(opts[:events].nil? || opts[:events].positive?, "--events must be at least 1")
    check(opts[:rate].finite? && opts[:rate] >= 0, "--rate must be 0 or a positive number")
    check(opts[:settle].finite? && opts[:settle].between?(0, 600), "--settle must be between 0 and 600 seconds")
    check(opts[:progress].finite? && opts[:progress].positive?, "--progress must be positive")
  end

  def self.check(condition, message)
    raise OptionParser::InvalidArgument, message unless condition
  end
end

# Small helpers for IPv4 addresses held as 32-bit integers.
module IPv4
  def self.to_s(ip)
    [ip].pack("N").unpack("C4").join(".")
  end
end

# One event of the test plan: which app, which IP, and its encoded bytes.
# The bytes are encoded once up front so that the send loop does no protobuf
# work and can keep up with high rates.
Event = Struct.new(:sha, :ip, :payload, :for_app, :bad)

# The random world of one run: an app under test with its home /28, some bad
# IPs, two other apps, and every (ip, app) pair as a ready-to-send event.
class Scenario
  BLOCK_MASK = 0xFFFF_FFF0
  GOOD_HOSTS = 14
  # Bad IPs this close to the block's base would fall inside (or right next
  # to) the home /28, which would make the expected answer ambiguous.
  NEAR_BLOCK = 28
  MAX_BAD = 10
  REDRAWS = 100

  attr_reader :base, :good_ips, :bad_ips, :app, :events

  def initialize(rng)
    @rng = rng
    @base = rng.rand(1 << 32) & BLOCK_MASK
    @good_ips = (1..GOOD_HOSTS).map { |host| @base + host }
    @bad_ips = draw_bad_ips
    shas = Array.new(3) { random_sha256 }
    @app = shas.first
    @events = build_events(shas)
  end

  def random_event
    @events[@rng.rand(@events.size)]
  end

  private

  # Draws 1 to 10 addresses away from the home block. A random address lands
  # near the block with odds of about one in 75 million, so the redraw loop
  # practically never repeats, but it is still bounded.
  def draw_bad_ips
    REDRAWS.times do
      wanted = @rng.rand(1..MAX_BAD)
      ips = Array.new(wanted) { @rng.rand(1 << 32) }
      ips = ips.reject { |ip| (ip - @base).abs <= NEAR_BLOCK }.uniq
      return ips unless ips.empty?
    end
    raise "could not draw a bad IP away from #{IPv4.to_s(@base)}/28"
  end

  # A sha256 is drawn from the seeded generator rather than SecureRandom so
  # that --seed reproduces the whole run.
  def random_sha256
    @rng.bytes(32).unpack1("H*")
  end

  def build_events(shas)
    bad = @bad_ips.to_set
    shas.product(@good_ips + @bad_ips).map do |sha, ip|
      payload = Lookout::BackendCodingQuestions::Q1::IpEvent.encode(
        Lookout::BackendCodingQuestions::Q1::IpEvent.new(app_sha256: sha, ip: ip)
      )
      Event.new(sha, ip, payload.freeze, sha == shas.first, bad.include?(ip)).freeze
    end.freeze
  end
end

# Keeps a send loop at a steady rate against the monotonic clock. It sleeps
# only when ahead of schedule, so short sleeps that overshoot are made up by
# later sends and the average rate stays on target. If the loop falls far
# behind (a stall), the schedule restarts from now instead of bursting to
# catch up, because a burst would overflow socket buffers and look like a
# server drop.
class Pacer
  MAX_LAG = 0.25

  def initialize(rate)
    @interval = rate.positive? ? 1.0 / rate : 0.0
    @start = now
    @scheduled = 0
  end

  def wait_turn
    return if @interval.zero?

    due = @start + @scheduled * @interval
    lag = now - due
    if lag.negative?
      sleep(-lag)
    elsif lag > MAX_LAG
      @start = now
      @scheduled = 0
    end
    @scheduled += 1
  end

  def now
    Process.clock_gettime(Process::CLOCK_MONOTONIC)
  end
end

# Sends datagrams from one socket with a 1 MiB send buffer.
class UdpSender
  SNDBUF = 1 << 20
  RETRY_SLEEP = 0.0005
  # A send that cannot get through for this long means the local network
  # stack is wedged, and waiting longer would not help the test.
  RETRY_LIMIT = 10.0

  def initialize(host, port)
    @address = resolve(host, port)
    @socket = Socket.new(@address.afamily, Socket::SOCK_DGRAM)
    @socket.setsockopt(Socket::SOL_SOCKET, Socket::SO_SNDBUF, SNDBUF)
    @sockaddr = @address.to_sockaddr
  end

  # A full send buffer shows up as EAGAIN (or ENOBUFS on some systems); the
  # datagram is not lost yet, so it is retried after a short pause.
  def send_event(event)
    deadline = nil
    loop do
      result = begin
        @socket.sendmsg_nonblock(event.payload, 0, @sockaddr, exception: false)
      rescue Errno::ENOBUFS, Errno::EAGAIN, IO::WaitWritable
        :wait_writable
      end
      return unless result == :wait_writable

      deadline ||= monotonic + RETRY_LIMIT
      raise IOError, "UDP send kept failing for #{RETRY_LIMIT} s (send buffer full)" if monotonic > deadline

      sleep(RETRY_SLEEP)
    end
  end

  def close
    @socket.close
  end

  private

  # Prefers IPv4 because the server listens on an IPv4 address by default,
  # while "localhost" often resolves to ::1 first.
  def resolve(host, port)
    candidates = Addrinfo.getaddrinfo(host, port, nil, :DGRAM)
    candidates.find(&:ipv4?) || candidates.first || raise(SocketError, "cannot resolve #{host}")
  end

  def monotonic
    Process.clock_gettime(Process::CLOCK_MONOTONIC)
  end
end

# Raised when the server answers, but not the way the test expects.
class CheckFailed < StandardError; end

# The server's HTTP API.
class Api
  TIMEOUT = 10

  def initialize(host, port)
    @host = host
    @port = port
  end

  def describe
    "http://#{@host}:#{@port}"
  end

  # Opens a connection that stays open for every request made in the block,
  # so that REST mode measures the server rather than TCP handshakes.
  def connect(&block)
    Net::HTTP.start(@host, @port, open_timeout: TIMEOUT, read_timeout: TIMEOUT,
                                  write_timeout: TIMEOUT, &block)
  end

  def reset
    response = connect { |http| http.request(Net::HTTP::Delete.new("/events", json_headers)) }
    return if %w[200 204].include?(response.code)

    raise CheckFailed, "DELETE /events answered #{describe_response(response)}, expected 204"
  end

  def post_event(http, event)
    request = Net::HTTP::Post.new("/events", json_headers.merge("Content-Type" => "application/octet-stream"))
    request.body = event.payload
    response = http.request(request)
    return if response.code == "204"

    raise CheckFailed, "POST /events answered #{describe_response(response)}, expected 204"
  end

  def fetch_app(sha)
    response = connect { |http| http.request(Net::HTTP::Get.new("/events/#{sha}", json_headers)) }
    unless response.code == "200"
      raise CheckFailed, "GET /events/#{sha} answered #{describe_response(response)}, expected 200"
    end

    parse_object(response.body)
  end

  private

  def json_headers
    { "Accept" => "application/json" }
  end

  def parse_object(body)
    parsed = JSON.parse(body.to_s)
    raise CheckFailed, "GET /events body is not a JSON object: #{excerpt(body)}" unless parsed.is_a?(Hash)

    parsed
  rescue JSON::ParserError
    raise CheckFailed, "GET /events body is not JSON: #{excerpt(body)}"
  end

  def describe_response(response)
    "#{response.code} #{excerpt(response.body)}".strip
  end

  def excerpt(body)
    text = body.to_s.gsub(/\s+/, " ").strip
    text.length > 300 ? "#{text[0, 300]}..." : text
  end
end

# What was actually sent, which is what the server's answer is checked
# against: UDP may lose a bad IP's every event, and the server cannot report
# an IP it never saw.
class Tally
  attr_reader :total, :for_app, :bad_for_app, :good_for_app

  def initialize
    @total = 0
    @for_app = 0
    @good_for_app = 0
    @bad_for_app = Set.new
  end

  def record(event)
    @total += 1
    return unless event.for_app

    @for_app += 1
    if event.bad
      @bad_for_app << event.ip
    else
      @good_for_app += 1
    end
  end
end

# Compares the server's answer for the app with what was sent.
class Verdict
  def initialize(scenario, tally, strict:)
    @scenario = scenario
    @tally = tally
    @strict = strict
    @problems = []
  end

  def judge(answer)
    count = check_count(answer["count"])
    if home_block_unseen?
      check_unseen_home(answer)
    else
      check_list(answer, "good_ips", expected_good)
      check_list(answer, "bad_ips", sent_bad)
    end
    if answer["ips_truncated"] == true
      @problems << "the server marked its IP lists as truncated, but the app has at most 24 IPs"
    end
    [count, @problems]
  end

  private

  def sent_bad
    @tally.bad_for_app.map { |ip| IPv4.to_s(ip) }
  end

  # When only bad IPs were sent for the app (possible only in very short
  # runs), the server never saw the home block and may take a bad IP's /28
  # as home. The split cannot be checked then, only that every IP sent shows
  # up somewhere and nothing unsent is called bad.
  def home_block_unseen?
    @tally.for_app.positive? && @tally.good_for_app.zero?
  end

  def check_unseen_home(answer)
    lists = %w[good_ips bad_ips].map { |key| answer[key] }
    unless lists.all? { |list| list.is_a?(Array) && list.all?(String) }
      @problems << "good_ips and bad_ips must both be lists of dotted quads"
      return
    end
    unreported = sent_bad.to_set - lists.flatten.to_set
    @problems << "IPs sent but not reported: #{sort_quads(unreported).join(', ')}" unless unreported.empty?
    invented = lists[1].to_set - sent_bad.to_set
    @problems << "bad_ips holds IPs never sent: #{sort_quads(invented).join(', ')}" unless invented.empty?
  end

  # With nothing sent for the app the server knows nothing about it, so it
  # must answer with a zero count and empty lists.
  def expected_good
    return [] if @tally.for_app.zero?

    @scenario.good_ips.map { |ip| IPv4.to_s(ip) }
  end

  def check_count(count)
    unless count.is_a?(Integer) && count >= 0
      @problems << "count is #{count.inspect}, expected a non-negative integer"
      return nil
    end
    sent = @tally.for_app
    # No resend happens anywhere, so a count above what was sent means the
    # reset did not take or events were counted twice.
    @problems << "count is #{count} but only #{sent} events were sent for the app" if count > sent
    @problems << "count is #{count}, expected exactly #{sent} (strict)" if @strict && count < sent
    count
  end

  def sort_quads(quads)
    quads.sort_by { |quad| quad.split(".").map(&:to_i) }
  end

  def check_list(answer, key, expected)
    actual = answer[key]
    unless actual.is_a?(Array) && actual.all?(String)
      @problems << "#{key} is #{actual.inspect[0, 200]}, expected a list of dotted quads"
      return
    end
    missing = expected.to_set - actual.to_set
    unexpected = actual.to_set - expected.to_set
    return if missing.empty? && unexpected.empty?

    detail = []
    detail << "missing #{sort_quads(missing).join(', ')}" unless missing.empty?
    detail << "unexpected #{sort_quads(unexpected).join(', ')}" unless unexpected.empty?
    @problems << "#{key} differs: #{detail.join('; ')}"
  end
end

# Runs one acceptance test from reset to verdict.
class LoadTest
  def initialize(opts)
    @opts = opts
    @seed = opts[:seed] || Random.new_seed
    @rng = Random.new(@seed)
    @api = Api.new(opts[:host], opts[:tcp])
    @rest = opts[:udp].zero?
  end

  def run
    scenario = Scenario.new(@rng)
    planned = @opts[:events] || @rng.rand(1...10_000)
    describe_plan(scenario, planned)

    @api.reset
    tally = @rest ? send_over_http(scenario, planned) : send_over_udp(scenario, planned)

    sleep(@opts[:settle])
    answer = @api.fetch_app(scenario.app)
    report(scenario, tally, answer)
  end

  private

  def describe_plan(scenario, planned)
    puts "seed #{@seed}"
    puts "app under test #{scenario.app}"
    puts "home block #{IPv4.to_s(scenario.base)}/28, good IPs " \
         "#{IPv4.to_s(scenario.good_ips.first)} .. #{IPv4.to_s(scenario.good_ips.last)}"
    puts "bad IPs #{scenario.bad_ips.map { |ip| IPv4.to_s(ip) }.join(', ')}"
    rate = @opts[:rate].positive? ? "#{@opts[:rate].round(1)}/s" : "unpaced"
    via = @rest ? "POST #{@api.describe}/events" : "UDP #{@opts[:host]}:#{@opts[:udp]}"
    puts "sending #{planned} events via #{via} at #{rate}"
  end

  def send_over_udp(scenario, planned)
    sender = UdpSender.new(@opts[:host], @opts[:udp])
    send_loop(scenario, planned) { |event| sender.send_event(event) }
  ensure
    sender&.close
  end

  def send_over_http(scenario, planned)
    @api.connect do |http|
      send_loop(scenario, planned) { |event| @api.post_event(http, event) }
    end
  end

  def send_loop(scenario, planned)
    tally = Tally.new
    pacer = Pacer.new(@opts[:rate])
    started = pacer.now
    next_progress = started + @opts[:progress]
    planned.times do
      pacer.wait_turn
      event = scenario.random_event
      yield event
      tally.record(event)
      next unless pacer.now >= next_progress

      progress(tally, planned, pacer.now - started)
      next_progress += @opts[:progress]
    end
    elapsed = pacer.now - started
    puts format("sent %<n>d events in %<t>.2f s (%<r>.0f/s)",
                n: tally.total, t: elapsed, r: tally.total / [elapsed, 1e-9].max)
    tally
  end

  def progress(tally, planned, elapsed)
    puts format("progress: %<n>d/%<p>d events sent in %<t>.1f s (%<r>.0f/s)",
                n: tally.total, p: planned, t: elapsed, r: tally.total / elapsed)
  end

  def report(scenario, tally, answer)
    strict = @opts[:strict] || @rest
    count, problems = Verdict.new(scenario, tally, strict: strict).judge(answer)
    report_count(scenario, tally, count) if count
    if tally.for_app.positive? && tally.good_for_app.zero?
      puts "note: only bad IPs were sent for the app, so the server never saw its home block; " \
           "the good/bad split is not checked"
    end

    if problems.empty?
      puts "PASS"
      true
    else
      problems.each { |problem| puts "  #{problem}" }
      puts "FAIL"
      false
    end
  end

  def report_count(scenario, tally, count)
    sent = tally.for_app
    dropped = sent - count
    handled = sent.zero? ? 100.0 : 100.0 * count / sent
    puts format("sent %<s>d events for %<a>s, server counted %<c>d: %<d>d dropped (%<h>.2f%% handled)",
                s: sent, a: scenario.app, c: count, d: dropped, h: handled)
  end
end

# Failures to reach the server at all, as opposed to wrong answers from it.
CONNECTION_ERRORS = [
  SocketError, IOError, EOFError, Timeout::Error,
  Errno::ECONNREFUSED, Errno::ECONNRESET, Errno::ECONNABORTED, Errno::EPIPE,
  Errno::EHOSTUNREACH, Errno::ENETUNREACH, Errno::ETIMEDOUT, Errno::EADDRNOTAVAIL
].freeze

def main(argv)
  $stdout.sync = true
  opts = Options.parse(argv)
  LoadTest.new(opts).run ? 0 : 1
rescue CheckFailed => e
  puts "  #{e.message}"
  puts "FAIL"
  1
rescue *CONNECTION_ERRORS => e
  warn "client.rb: cannot talk to the server at #{opts && opts[:host]} " \
       "(HTTP #{opts && opts[:tcp]}, UDP #{opts && opts[:udp]}): #{e.class}: #{e.message}"
  2
rescue Interrupt
  warn "client.rb: interrupted"
  130
end

exit(main(ARGV)) if $PROGRAM_NAME == __FILE__
