# frozen_string_literal: true
# The IpEvent message for Ruby, from proto/ip_event.proto, in the form that
# `protoc --ruby_out` generates since protobuf 3.25: the file's serialized
# FileDescriptorProto, added to the generated pool. Debian's ruby-google-protobuf (3.21)
# loads it (CI runs tools/client.rb with it), and it is the only form the protobuf 4.x gem
# takes, which dropped the older add_file/add_message DSL.
# Regenerate with: protoc -Iproto --ruby_out=tools ip_event.proto

require 'google/protobuf'


descriptor_data = "\n\x0eip_event.proto\x12\#lookout.backend_coding_questions.q1\"8\n\x07IpEvent\x12\x1d\n\napp_sha256\x18\x01 \x02(\x09R\x09appSha256\x12\x0e\n\x02ip\x18\x02 \x02(\x03R\x02ip"

pool = Google::Protobuf::DescriptorPool.generated_pool
pool.add_serialized_file(descriptor_data)

module Lookout
  module BackendCodingQuestions
    module Q1
      IpEvent = ::Google::Protobuf::DescriptorPool.generated_pool.lookup("lookout.backend_coding_questions.q1.IpEvent").msgclass
    end
  end
end
